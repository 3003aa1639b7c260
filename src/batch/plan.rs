//! The job list: the run's defaults and each line's overrides resolved into items with their
//! seeds, each line checked against the model before any work.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::pipeline::{Sampling, StableDiffusion};
use crate::Result;

use super::manifest::{cfg_micros, ItemKey, RunInfo};
use super::prompt_file::{Line, LineError, PromptFile};

/// The run's defaults, from the command line; a line's own options override them.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub negative_prompt: String,
    pub sampling: Sampling,
    /// Images per line when the line gives neither `batch_size` nor `n_iter` (`-n/--repeat`).
    pub repeat: usize,
}

/// Where an image's seed came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeedFrom {
    /// The line's own `seed` (+ k for the line's k-th image, as A1111 does).
    Line,
    /// The run's seed + the item's index.
    Run,
}

/// One image to make: an item of the run.
#[derive(Debug, Clone)]
pub struct Job {
    /// Position in the run, from 0, across all files in the order given.
    pub index: usize,
    /// The prompt file and 1-based line the item comes from.
    pub path: PathBuf,
    pub line: usize,
    pub prompt: String,
    pub negative_prompt: String,
    pub sampling: Sampling,
    pub seed: u64,
    pub seed_from: SeedFrom,
}

impl Job {
    /// `file:line` of the item's line.
    pub fn source(&self) -> String {
        format!("{}:{}", self.path.display(), self.line)
    }

    /// What makes the item the item: two jobs with equal keys make the same image with `model`.
    pub fn key(&self, run: &RunInfo) -> ItemKey {
        let s = &self.sampling;
        ItemKey {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            width: s.width,
            height: s.height,
            steps: s.steps,
            cfg_micros: cfg_micros(s.guidance),
            scheduler: s.scheduler.cli_name().to_string(),
            karras: s.karras,
            rng: s.rng.to_string(),
            model: run.model.clone(),
            dtype: run.dtype.clone(),
            vae: run.vae.clone(),
            loras: run.loras.clone(),
            prompt_syntax: s.text.syntax,
            clip_skip: s.text.clip_skip,
        }
    }
}

/// The items of a run and the lines that could not be used, in file order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub jobs: Vec<Job>,
    pub errors: Vec<LineError>,
}

impl Plan {
    /// Resolves every line against `defaults` into jobs.
    ///
    /// Images per line: the line's `batch_size` x `n_iter` when it gives either, else
    /// `defaults.repeat`. Seeds: a line's own seed s gives s, s+1, ... for its images; else
    /// image `index` of the run gets `run_seed + index`. `validate` checks each line's first job
    /// against the model (size, steps, scheduler); a line it rejects makes no items and is
    /// reported like a malformed one. Indices count only the items of usable lines.
    pub fn new(
        files: &[PromptFile],
        defaults: &Defaults,
        run_seed: u64,
        validate: &dyn Fn(&Job) -> Result<()>,
    ) -> Plan {
        let mut jobs = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            let mut file_errors = file.errors.clone();
            for line in &file.lines {
                let error = |message: String| LineError {
                    path: file.path.clone(),
                    line: line.line,
                    message,
                };
                match resolve_line(file, line, defaults, run_seed, jobs.len(), validate) {
                    Ok(mut more) => jobs.append(&mut more),
                    Err(message) => file_errors.push(error(message)),
                }
            }
            file_errors.sort_by_key(|e| e.line);
            errors.extend(file_errors);
        }
        Plan { jobs, errors }
    }
}

fn resolve_line(
    file: &PromptFile,
    line: &Line,
    defaults: &Defaults,
    run_seed: u64,
    first_index: usize,
    validate: &dyn Fn(&Job) -> Result<()>,
) -> std::result::Result<Vec<Job>, String> {
    let spec = &line.spec;
    let mut s = defaults.sampling.clone();
    if let Some(w) = spec.width {
        s.width = w;
    }
    if let Some(h) = spec.height {
        s.height = h;
    }
    if let Some(steps) = spec.steps {
        s.steps = steps;
    }
    if let Some(cfg) = spec.cfg_scale {
        s.guidance = cfg;
    }
    if let Some(kind) = spec.scheduler {
        s.scheduler = kind;
    }
    if let Some(karras) = spec.karras {
        s.karras = karras;
    }
    let count = match (spec.batch_size, spec.n_iter) {
        (None, None) => defaults.repeat,
        (b, n) => b
            .unwrap_or(1)
            .checked_mul(n.unwrap_or(1))
            .ok_or("batch_size x n_iter is too large")?,
    };
    let mut jobs = Vec::with_capacity(count);
    for k in 0..count {
        let index = first_index + k;
        let (seed, seed_from) = match spec.seed {
            Some(own) => (own.checked_add(k as u64), SeedFrom::Line),
            None => (run_seed.checked_add(index as u64), SeedFrom::Run),
        };
        let Some(seed) = seed else {
            return Err("the seed + image number overflows 64 bits".into());
        };
        jobs.push(Job {
            index,
            path: file.path.clone(),
            line: line.line,
            prompt: spec.prompt.clone(),
            negative_prompt: spec
                .negative_prompt
                .clone()
                .unwrap_or_else(|| defaults.negative_prompt.clone()),
            sampling: s.clone(),
            seed,
            seed_from,
        });
    }
    if let Some(first) = jobs.first() {
        validate(first).map_err(|e| e.to_string())?;
    }
    Ok(jobs)
}

/// Checks a job against the model before any work: its prompt and its sampling settings
/// (the pipeline's one check of them, [`StableDiffusion::check_sampling`]).
pub fn validate_job(model: &StableDiffusion, job: &Job) -> Result<()> {
    crate::pipeline::check_prompts(&job.prompt, &job.negative_prompt)?;
    let s = &job.sampling;
    crate::prompt::check_prompts(&job.prompt, &job.negative_prompt, &s.text, s.steps)?;
    model.prompt_loras(&job.prompt)?;
    model.check_sampling(&job.sampling, 1)
}
