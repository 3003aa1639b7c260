//! `--check` as a library call: the plan of a prepared batch and an estimate of its time,
//! measured with one UNet step and one decode per batch shape; nothing is written.
use std::collections::HashMap;

use serde::Serialize;

use super::run::Batch;
use super::{estimate, group_jobs, probe, sampler_name, Probe};
use crate::Result;

/// One item of the plan, as the check lists it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckItem {
    pub index: usize,
    pub seed: u64,
    /// `file:line` of the item's line.
    pub source: String,
    pub prompt: String,
}

/// Items that share their sampling settings and so their batches.
#[derive(Debug, Clone, Serialize)]
pub struct CheckGroup {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub sampler: String,
    pub guidance: f64,
    pub rng: String,
    pub batches: usize,
    /// Images in the group's largest batch.
    pub batch_size: usize,
    pub estimate_s: f64,
    pub step_s: f64,
    pub decode_s: f64,
    pub items: Vec<CheckItem>,
}

/// What `--check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub items: usize,
    pub run_seed: u64,
    pub to_make: usize,
    pub batches: usize,
    pub batch_size: usize,
    pub done: usize,
    /// Items found complete without a record (recorded by the next run).
    pub recovered: usize,
    pub blocked: usize,
    pub bad_lines: usize,
    pub max_images: Option<usize>,
    pub groups: Vec<CheckGroup>,
    pub estimate_s: f64,
}

impl CheckReport {
    /// True when a line or an item would fail.
    pub fn has_problems(&self) -> bool {
        self.blocked > 0 || self.bad_lines > 0
    }
}

impl Batch<'_> {
    /// Groups the items left as a run would and times one step and one decode per shape.
    pub fn check(&self) -> Result<CheckReport> {
        let model = self.model();
        let batch_size = self.config().batch_size;
        let todo = self.todo();
        let groups = group_jobs(todo.iter().copied());
        let mut probes: HashMap<(usize, usize, bool, usize), Probe> = HashMap::new();
        let mut report = CheckReport {
            items: self.plan().jobs.len(),
            run_seed: self.run_seed(),
            to_make: todo.len(),
            batches: 0,
            batch_size,
            done: self.done(),
            recovered: self.recovered(),
            blocked: self.blocked().len(),
            bad_lines: self.line_errors().len(),
            max_images: self.config().max_images,
            groups: Vec::new(),
            estimate_s: 0.0,
        };
        for group in &groups {
            let s = group.sampling();
            let b = batch_size.min(group.jobs.len());
            let batches = group.jobs.len().div_ceil(batch_size);
            let key = (s.width, s.height, model.uses_cfg(s.guidance), b);
            let probe = match probes.get(&key) {
                Some(p) => *p,
                None => {
                    let p = probe(model, s, b)?;
                    probes.insert(key, p);
                    p
                }
            };
            let scheduler_steps = model
                .scheduler(s.scheduler, s.steps, s.karras)?
                .timesteps()
                .len();
            let estimate_s =
                estimate(&probe, scheduler_steps, batches, group.jobs.len()).as_secs_f64();
            report.batches += batches;
            report.estimate_s += estimate_s;
            report.groups.push(CheckGroup {
                width: s.width,
                height: s.height,
                steps: s.steps,
                sampler: sampler_name(s.scheduler, s.karras),
                guidance: s.guidance,
                rng: s.rng.to_string(),
                batches,
                batch_size: b,
                estimate_s,
                step_s: probe.step_s,
                decode_s: probe.decode_s,
                items: group
                    .jobs
                    .iter()
                    .map(|job| CheckItem {
                        index: job.index,
                        seed: job.seed,
                        source: job.source(),
                        prompt: job.prompt.clone(),
                    })
                    .collect(),
            });
        }
        Ok(report)
    }
}
