//! The batch run as a library call: settings checked once, a plan read under the output
//! folder's lock (resume, recovered files, clashes), then the render loop reporting through an
//! event callback and stopping on a [`Cancel`] request, a `max_images` limit or a full disk.
//! The command line only configures it, draws progress and prints the [`Summary`].
use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::shard::{self, Shard};
use super::{
    existing_file, group_jobs, render_jobs, validate_job, Defaults, Existing, Finished, Job,
    LineError, Manifest, NameTemplate, Plan, PromptFile, Record, RecordTimings, RunInfo,
    MANIFEST_NAME,
};
use crate::files::{self, FolderLock, LockMode};
use crate::output::{self, GenerationParams};
use crate::pipeline::{Event, Sampling, StableDiffusion, Timings};
use crate::{Cancel, Error, Result, Setting};

/// How a batch runs, apart from its prompt files and the model's sampling defaults.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Output folder: PNGs, the manifest, the lock.
    pub out_dir: PathBuf,
    /// Run seed; `None` takes the one recorded in the manifest, else `new_seed`.
    pub seed: Option<u64>,
    /// Seed of a fresh run when none is given or recorded (the caller's random choice, so the
    /// library stays deterministic).
    pub new_seed: u64,
    /// Images per line unless the line says otherwise.
    pub repeat: usize,
    /// Images per UNet call.
    pub batch_size: usize,
    /// Stop after this many new images.
    pub max_images: Option<usize>,
    /// Output file names.
    pub template: NameTemplate,
    /// Replace files in the way of unfinished items.
    pub overwrite: bool,
    /// Wait for another run holding the folder instead of failing with [`Error::InUse`].
    pub wait: bool,
    /// Make only this shard's items, beside the other shards in the same folder.
    pub shard: Option<Shard>,
}

impl BatchConfig {
    /// The one check of the run's counts, before any work.
    pub fn validate(&self) -> Result<()> {
        let at_least_one = |setting, value: usize| {
            if value == 0 {
                Err(Error::setting(setting, value, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        at_least_one(Setting::Repeat, self.repeat)?;
        at_least_one(Setting::BatchSize, self.batch_size)?;
        if let Some(max) = self.max_images {
            at_least_one(Setting::MaxImages, max)?;
        }
        Ok(())
    }

    /// The manifest this run appends to: `manifest.jsonl`, or a shard's own.
    pub fn manifest_path(&self) -> PathBuf {
        match &self.shard {
            Some(shard) => self.out_dir.join(shard.manifest_name()),
            None => self.out_dir.join(MANIFEST_NAME),
        }
    }
}

/// Whether a prepared batch may write (a run) or only reads (`--check`), or keeps its images
/// in memory (a server's request that saves nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Locks the folder, removes leftover temporary files, opens the manifest for appending and
    /// records images found without a record.
    Write,
    /// Takes no lock and changes nothing: it must not block on, or disturb, a run in progress.
    Read,
    /// Touches no folder (`out_dir` is not used): every item is made, and each image is handed
    /// to the caller as PNG bytes with its record ([`BatchEvent::Made`]) instead of written.
    Memory,
}

/// A planned batch: every line checked, every item sorted into done, to make or blocked.
pub struct Batch<'m> {
    model: &'m StableDiffusion,
    config: BatchConfig,
    plan: Plan,
    names: Vec<PathBuf>,
    run: RunInfo,
    /// Indices (into `plan.jobs`) of the items to make, in item order.
    todo: Vec<usize>,
    /// Items of this run's shard (all items without one).
    owned: usize,
    done: usize,
    recovered: usize,
    blocked: Vec<String>,
    warnings: Vec<String>,
    manifest: Option<Manifest>,
    access: Access,
    // Held for the life of the batch; released by the OS however the process ends.
    _lock: Option<FolderLock>,
}

impl<'m> Batch<'m> {
    /// Plans the batch of `files` with `model`: checks `config`, takes the folder (with
    /// [`Access::Write`]) before reading its manifest, resolves and validates every line, and
    /// sorts the items.
    pub fn prepare(
        model: &'m StableDiffusion,
        config: BatchConfig,
        files: &[PromptFile],
        negative_prompt: &str,
        sampling: Sampling,
        access: Access,
    ) -> Result<Batch<'m>> {
        config.validate()?;
        let out_dir = &config.out_dir;
        if access != Access::Memory && out_dir.exists() && !out_dir.is_dir() {
            return Err(Error::setting(
                Setting::Output,
                out_dir.display(),
                "is a file; give a folder",
            ));
        }
        let manifest_path = config.manifest_path();
        let lock = match access {
            Access::Write => {
                let mode = config
                    .shard
                    .map_or(LockMode::Exclusive, |shard| shard.lock_mode());
                Some(FolderLock::acquire(out_dir, mode, config.wait)?)
            }
            Access::Read | Access::Memory => None,
        };
        let mut warnings = Vec::new();
        let (mut manifest, contents) = match access {
            Access::Write => {
                let (m, c) = Manifest::open(&manifest_path)?;
                (Some(m), c)
            }
            Access::Read => (None, Manifest::read(&manifest_path)?),
            Access::Memory => (None, Default::default()),
        };
        if let Some(torn) = &contents.torn {
            warnings.push(format!(
                "warning: {}: {} the incomplete last record left by a stopped run ({} bytes)",
                manifest_path.display(),
                if manifest.is_some() {
                    "dropped"
                } else {
                    "ignoring"
                },
                torn.len()
            ));
        }
        // Every manifest of the folder counts as one: shards, and runs before or after them.
        let mut records = match access {
            Access::Memory => Vec::new(),
            Access::Write | Access::Read => shard::read_all(out_dir, Some(&manifest_path))?,
        };
        records.extend(contents.records);
        let recorded_seed = records.last().map(|r| r.run_seed);
        let run_seed =
            match (config.seed, recorded_seed, config.shard) {
                (Some(seed), _, _) | (None, Some(seed), _) => seed,
                // Each shard would pick its own seed, and the shards would not add up to one run.
                (None, None, Some(_)) => return Err(Error::setting(
                    Setting::Seed,
                    "(none)",
                    "a sharded batch needs one run seed for all its shards: give the same seed \
                     to every shard (or resume a folder whose manifest records it)",
                )),
                (None, None, None) => config.new_seed,
            };
        let defaults = Defaults {
            negative_prompt: negative_prompt.to_string(),
            sampling,
            repeat: config.repeat,
        };
        let plan = Plan::new(files, &defaults, run_seed, &|job| validate_job(model, job));
        let names = config.template.assign(&plan.jobs)?;
        let shard = config.shard;
        let owns = move |index: usize| shard.is_none_or(|shard| shard.owns(index));
        if lock.is_some() {
            // Under the exclusive lock every temporary file of ours is a leftover of a killed
            // run. A shard removes only those of its own items: the other shards' may be
            // files they are writing now.
            let own: HashSet<&OsStr> = plan
                .jobs
                .iter()
                .filter(|job| owns(job.index))
                .filter_map(|job| names[job.index].file_name())
                .collect();
            files::remove_temps(out_dir, |target| {
                shard.is_none() || own.contains(OsStr::new(target))
            })?;
        }
        let run = RunInfo {
            run_seed,
            model: model.name().to_string(),
            device: format!("{:?}", model.device().location()),
            dtype: model.dtype().as_str().to_string(),
            vae: model.vae_name().map(str::to_string),
            loras: RunInfo::loras_of(model),
        };
        let finished = Finished::new(out_dir, &records);
        let mut batch = Batch {
            model,
            config,
            plan,
            names,
            run,
            todo: Vec::new(),
            owned: 0,
            done: 0,
            recovered: 0,
            blocked: Vec::new(),
            warnings,
            manifest: None,
            access,
            _lock: lock,
        };
        for job in &batch.plan.jobs {
            if !owns(job.index) {
                continue;
            }
            batch.owned += 1;
            if access == Access::Memory {
                batch.todo.push(job.index);
                continue;
            }
            if finished.file(&job.key(&batch.run)).is_some() {
                batch.done += 1;
                continue;
            }
            let path = batch.config.out_dir.join(&batch.names[job.index]);
            let parameters = parameters(model, job);
            match existing_file(&path, &parameters) {
                Existing::Missing => batch.todo.push(job.index),
                Existing::Different(_) if batch.config.overwrite => batch.todo.push(job.index),
                Existing::Different(why) => batch.blocked.push(format!(
                    "{}: item {}: {} is in the way: {why}; remove it, pass --overwrite, or use \
                     another -o",
                    job.source(),
                    job.index,
                    path.display()
                )),
                Existing::Same => {
                    batch.recovered += 1;
                    if let Some(m) = manifest.as_mut() {
                        let name = &batch.names[job.index];
                        m.append(&Record::new(job, name, &batch.run, None, parameters, None))?;
                    }
                }
            }
        }
        batch.manifest = manifest;
        Ok(batch)
    }

    /// The resolved items and the lines that could not be used.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The run seed: given, recorded, or new.
    pub fn run_seed(&self) -> u64 {
        self.run.run_seed
    }

    /// The model the batch renders with.
    pub fn model(&self) -> &'m StableDiffusion {
        self.model
    }

    /// The settings this batch was prepared with.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Line errors of the prompt files, in file order.
    pub fn line_errors(&self) -> &[LineError] {
        &self.plan.errors
    }

    /// Items whose file name is taken by another file, one message each.
    pub fn blocked(&self) -> &[String] {
        &self.blocked
    }

    /// Things worth telling the user that do not stop the run (a torn manifest record).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Items already finished (recorded, or found complete without a record).
    pub fn skipped(&self) -> usize {
        self.done + self.recovered
    }

    /// Items already recorded with their file.
    pub fn done(&self) -> usize {
        self.done
    }

    /// Items whose PNG was found complete without a record.
    pub fn recovered(&self) -> usize {
        self.recovered
    }

    /// The items left to make, in item order.
    pub fn todo(&self) -> Vec<&Job> {
        self.todo.iter().map(|&i| &self.plan.jobs[i]).collect()
    }

    /// Renders the items left, batch by batch, reporting through `on_event`; stops after the
    /// batch in flight once `cancel` is requested, at `max_images`, or at the first write that
    /// finds the disk full. A failed batch or write is reported and the run goes on.
    pub fn run(mut self, cancel: &Cancel, on_event: &mut dyn FnMut(BatchEvent)) -> Result<Summary> {
        let started = Instant::now();
        // `None` keeps the images in memory (`Access::Memory`).
        let mut manifest = match (self.manifest.take(), self.access) {
            (Some(m), _) => Some(m),
            (None, Access::Memory) => None,
            (None, _) => {
                return Err(Error::InvalidInput(
                    "a batch prepared with Access::Read cannot run".into(),
                ))
            }
        };
        let batch_size = self.config.batch_size;
        let limit = self.config.max_images.unwrap_or(usize::MAX);
        let todo = self.todo();
        let groups = group_jobs(todo.iter().copied());
        let batches: usize = groups
            .iter()
            .map(|g| g.jobs.len().div_ceil(batch_size))
            .sum();
        on_event(BatchEvent::Started {
            items: todo.len().min(limit),
            batches,
        });
        let mut summary = Summary {
            items: self.owned,
            made: 0,
            skipped: self.skipped(),
            failed: self.blocked.len(),
            left: 0,
            bad_lines: self.plan.errors.len(),
            stop: Stop::Finished,
            elapsed_s: 0.0,
            generating_s: 0.0,
            out_dir: self.config.out_dir.clone(),
        };
        let mut generating = Duration::ZERO;
        let mut number = 0usize;
        'run: for group in &groups {
            for chunk in group.batches(batch_size) {
                if cancel.is_requested() {
                    summary.stop = Stop::Cancelled;
                    break 'run;
                }
                let room = limit - summary.made;
                if room == 0 {
                    summary.stop = Stop::Limit(limit);
                    break 'run;
                }
                let chunk = &chunk[..chunk.len().min(room)];
                number += 1;
                on_event(BatchEvent::BatchStarted {
                    number,
                    of: batches,
                    images: chunk.len(),
                });
                let mut timings = Timings::default();
                let rendered = render_jobs(
                    self.model,
                    chunk,
                    summary.made,
                    &mut timings,
                    cancel,
                    &mut |e| on_event(BatchEvent::Pipeline(e)),
                );
                let images = match rendered {
                    Ok(images) => images,
                    // Stopped between two steps: the batch's items are left, not failed.
                    Err(Error::Interrupted) => {
                        summary.stop = Stop::Cancelled;
                        break 'run;
                    }
                    Err(error) => {
                        summary.failed += chunk.len();
                        for job in chunk {
                            on_event(BatchEvent::Failed { job, error: &error });
                        }
                        continue;
                    }
                };
                generating += timings.denoise + timings.decode + timings.text_encode;
                let share = RecordTimings::from_batch(&timings, chunk.len());
                for (job, image) in chunk.iter().zip(&images) {
                    let name = &self.names[job.index];
                    let path = self.config.out_dir.join(name);
                    let parameters = parameters(self.model, job);
                    let record = Record::new(
                        job,
                        name,
                        &self.run,
                        Some(chunk.len()),
                        parameters.clone(),
                        Some(share.clone()),
                    );
                    let written = {
                        let _writing = cancel.writing();
                        match manifest.as_mut() {
                            Some(manifest) => output::write_image(
                                &path,
                                image,
                                &parameters,
                                self.config.overwrite,
                            )
                            .and_then(|()| manifest.append(&record))
                            .map(|()| None),
                            None => output::png_bytes(image, &parameters).map(Some),
                        }
                    };
                    match written {
                        Ok(None) => {
                            summary.made += 1;
                            on_event(BatchEvent::Written {
                                path: &path,
                                record: &record,
                            });
                        }
                        Ok(Some(png)) => {
                            summary.made += 1;
                            on_event(BatchEvent::Made {
                                png: &png,
                                record: &record,
                            });
                        }
                        Err(error) if error.is_disk_full() => {
                            // Every later write would fail the same way: stop now, with what
                            // is done recorded, rather than render the rest for nothing.
                            summary.failed += 1;
                            on_event(BatchEvent::Failed { job, error: &error });
                            summary.stop = Stop::DiskFull(error.to_string());
                            break 'run;
                        }
                        Err(error) => {
                            summary.failed += 1;
                            on_event(BatchEvent::Failed { job, error: &error });
                        }
                    }
                }
            }
        }
        summary.left = summary.items - summary.skipped - summary.made - summary.failed;
        summary.elapsed_s = started.elapsed().as_secs_f64();
        summary.generating_s = generating.as_secs_f64();
        Ok(summary)
    }
}

/// The `parameters` text an item's PNG carries.
pub(crate) fn parameters(model: &StableDiffusion, job: &Job) -> String {
    GenerationParams::for_image(
        model,
        &job.prompt,
        &job.negative_prompt,
        &job.sampling,
        job.seed,
    )
    .to_a1111()
}

/// What a run reports while it works.
#[derive(Debug)]
pub enum BatchEvent<'a> {
    /// The loop starts: `items` to make (within `max_images`) in `batches` UNet batches.
    Started { items: usize, batches: usize },
    /// Batch `number` of `of` starts with `images` images.
    BatchStarted {
        number: usize,
        of: usize,
        images: usize,
    },
    /// Progress inside the pipeline.
    Pipeline(Event),
    /// An image and its record were written.
    Written { path: &'a Path, record: &'a Record },
    /// An image of a run kept in memory ([`Access::Memory`]): its PNG, with the `parameters`
    /// text a written file carries, and the record a manifest would hold.
    Made { png: &'a [u8], record: &'a Record },
    /// An item failed; the run goes on unless the error stops it ([`Stop`]).
    Failed { job: &'a Job, error: &'a Error },
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "detail")]
pub enum Stop {
    /// Every item was tried.
    Finished,
    /// `max_images` new images were made.
    Limit(usize),
    /// A cancel request stopped it after a batch.
    Cancelled,
    /// A write found the disk full; the message names the file.
    DiskFull(String),
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Items in the plan (of this shard, in a sharded run).
    pub items: usize,
    /// Images made by this run.
    pub made: usize,
    /// Items finished before this run.
    pub skipped: usize,
    /// Items that failed (render or write errors, files in the way).
    pub failed: usize,
    /// Items not tried.
    pub left: usize,
    /// Prompt-file lines that could not be used.
    pub bad_lines: usize,
    /// Why the run ended.
    pub stop: Stop,
    /// Seconds the run loop took.
    pub elapsed_s: f64,
    /// Seconds spent encoding, denoising and decoding.
    pub generating_s: f64,
    /// The output folder.
    pub out_dir: PathBuf,
}

impl Summary {
    /// True when the run ended before trying every item.
    pub fn stopped_early(&self) -> bool {
        self.stop != Stop::Finished && self.left > 0
    }
}
