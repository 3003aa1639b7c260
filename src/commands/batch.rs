//! `latent batch`: prompt files in; one folder of PNGs and a manifest out. Resumable, and a bad
//! line or a failed item never stops the others.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use latent::batch::{
    self, Defaults, Existing, Finished, Group, Job, Manifest, NameTemplate, Plan, Probe, Record,
    RecordTimings, RunInfo,
};
use latent::output;
use latent::pipeline::{Residency, StableDiffusion, Timings};

use super::{load_model, params_for, random_seed, sampling_for};
use crate::cli::BatchArgs;
use crate::progress::Progress;

/// Ctrl-C presses so far: the first asks to stop after the current batch, the second abandons it.
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

/// Held while an image's PNG and its manifest record are written. A second Ctrl-C takes it
/// before exiting, so the process never dies between a file and its record.
static WRITING: Mutex<()> = Mutex::new(());

/// Exit status after an abandoned batch (128 + SIGINT, as shells report it).
const ABANDON_EXIT: i32 = 130;

fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTS.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!(
                "\ninterrupted: finishing the current batch, then stopping (Ctrl-C again to \
                 abandon it)"
            );
        } else {
            let _writing = WRITING
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            eprintln!(
                "\ninterrupted again: abandoning the current batch; every finished image is in \
                 the manifest, run the same command again to resume"
            );
            std::process::exit(ABANDON_EXIT);
        }
    })
    .context("cannot install the Ctrl-C handler")
}

fn interrupted() -> bool {
    INTERRUPTS.load(Ordering::SeqCst) > 0
}

/// `outputs/<stem of the first prompt file>`: the same command finds its own folder again.
fn default_output(first: &Path) -> PathBuf {
    let stem = first
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty() && s != "." && s != "..")
        .unwrap_or_else(|| "batch".into());
    Path::new("outputs").join(stem)
}

/// What happens to each planned item.
struct Sorted<'a> {
    /// Items to make, in item order.
    todo: Vec<&'a Job>,
    /// Items whose image is already in the manifest with its file.
    done: usize,
    /// Items whose PNG was found without a record (written just before an earlier run stopped);
    /// recorded now, or in `--check` only counted.
    recovered: usize,
    /// Items whose file name is taken by another file.
    blocked: Vec<String>,
}

/// `latent batch`.
pub fn batch(args: BatchArgs) -> Result<()> {
    let started = Instant::now();
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.max_images == Some(0) {
        bail!("--max-images must be at least 1");
    }
    let template: NameTemplate = args.filename.parse()?;
    // Whole-file problems (missing, not UTF-8, empty) stop the run before the model loads.
    let files = args
        .files
        .iter()
        .map(|p| batch::read_prompt_file(p, args.format))
        .collect::<latent::Result<Vec<_>>>()?;
    let out_dir = match &args.output {
        Some(dir) => dir.clone(),
        None => default_output(&args.files[0]),
    };
    if out_dir.exists() && !out_dir.is_dir() {
        bail!(
            "{}: -o takes a folder, and this is a file",
            out_dir.display()
        );
    }
    let manifest_path = out_dir.join(batch::MANIFEST_NAME);

    let mut progress = Progress::new(args.quiet);
    let model = load_model(&args.model, Residency::Resident, &mut progress)?;
    let defaults = Defaults {
        negative_prompt: args.sampling.negative_prompt.clone(),
        sampling: sampling_for(&model, &args.sampling)?,
        repeat: args.repeat,
    };

    // `--check` only reads; a run creates the folder and the manifest and repairs a torn record.
    let (mut manifest, contents) = if args.check {
        (None, Manifest::read(&manifest_path)?)
    } else {
        let (m, c) = Manifest::open(&manifest_path)?;
        (Some(m), c)
    };
    if let Some(torn) = &contents.torn {
        progress.println(&format!(
            "warning: {}: {} the incomplete last record left by a stopped run ({} bytes)",
            manifest_path.display(),
            if args.check { "ignoring" } else { "dropped" },
            torn.len()
        ));
    }
    let run_seed = args
        .seed
        .or_else(|| contents.records.last().map(|r| r.run_seed))
        .unwrap_or_else(random_seed);
    let plan = Plan::new(&files, &defaults, run_seed, &|job| {
        batch::validate_job(&model, job)
    });
    for e in &plan.errors {
        progress.println(&e.to_string());
    }
    let names = template.assign(&plan.jobs)?;
    let run = RunInfo {
        run_seed,
        model: model.name().to_string(),
        device: format!("{:?}", model.device().location()),
        dtype: format!("{:?}", model.dtype()).to_lowercase(),
    };
    let finished = Finished::new(&out_dir, &contents.records);

    let mut sorted = Sorted {
        todo: Vec::new(),
        done: 0,
        recovered: 0,
        blocked: Vec::new(),
    };
    for job in &plan.jobs {
        if finished.file(&job.key(model.name())).is_some() {
            sorted.done += 1;
            continue;
        }
        let name = &names[job.index];
        let path = out_dir.join(name);
        let parameters = parameters(&model, job);
        match batch::existing_file(&path, &parameters) {
            Existing::Missing => sorted.todo.push(job),
            Existing::Different(_) if args.overwrite => sorted.todo.push(job),
            Existing::Different(why) => sorted.blocked.push(format!(
                "{}: item {}: {} is in the way: {why}; remove it, pass --overwrite, or use \
                 another -o",
                job.source(),
                job.index,
                path.display()
            )),
            Existing::Same => {
                sorted.recovered += 1;
                if let Some(m) = manifest.as_mut() {
                    let record = Record::new(job, name, &run, None, parameters, None);
                    m.append(&record)?;
                }
            }
        }
    }
    for line in &sorted.blocked {
        progress.println(line);
    }

    if args.check {
        return check(&args, &model, &plan, &sorted, &out_dir, run_seed);
    }
    let Some(manifest) = manifest.as_mut() else {
        bail!("the manifest was not opened");
    };

    let limit = args.max_images.unwrap_or(usize::MAX);
    let groups = batch::group_jobs(sorted.todo.iter().copied());
    let batches: usize = groups
        .iter()
        .map(|g| g.jobs.len().div_ceil(args.batch_size))
        .sum();
    install_interrupt_handler()?;
    progress.start_items(sorted.todo.len().min(limit) as u64);

    let mut made = 0usize;
    let mut failed = sorted.blocked.len();
    let mut stopped_by_limit = false;
    let mut batch_number = 0usize;
    let mut generating_time = Duration::ZERO;
    'run: for group in &groups {
        for chunk in group.batches(args.batch_size) {
            if interrupted() {
                break 'run;
            }
            let room = limit - made;
            if room == 0 {
                stopped_by_limit = true;
                break 'run;
            }
            let chunk = &chunk[..chunk.len().min(room)];
            batch_number += 1;
            progress.start_batch(&format!(
                "batch {batch_number}/{batches} ({} image{})",
                chunk.len(),
                if chunk.len() == 1 { "" } else { "s" }
            ));
            let mut timings = Timings::default();
            let images = match batch::render_jobs(&model, chunk, made, &mut timings, &mut |e| {
                progress.event(e)
            }) {
                Ok(images) => images,
                Err(e) => {
                    for job in chunk {
                        progress.println(&format!(
                            "{}: item {}: failed: {e}",
                            job.source(),
                            job.index
                        ));
                    }
                    failed += chunk.len();
                    progress.items_done(chunk.len() as u64);
                    continue;
                }
            };
            generating_time += timings.denoise + timings.decode + timings.text_encode;
            let share = RecordTimings::from_batch(&timings, chunk.len());
            for (job, image) in chunk.iter().zip(&images) {
                let name = &names[job.index];
                let path = out_dir.join(name);
                let parameters = parameters(&model, job);
                let record = Record::new(
                    job,
                    name,
                    &run,
                    Some(chunk.len()),
                    parameters.clone(),
                    Some(share.clone()),
                );
                let written = {
                    let _writing = WRITING.lock().unwrap_or_else(|p| p.into_inner());
                    output::write_png(
                        &path,
                        &image.rgb,
                        image.width as u32,
                        image.height as u32,
                        &parameters,
                        args.overwrite,
                    )
                    .and_then(|()| manifest.append(&record))
                };
                progress.items_done(1);
                match written {
                    Ok(()) => {
                        made += 1;
                        if args.json {
                            let line = JsonLine {
                                path: path.display().to_string(),
                                record: &record,
                            };
                            println!("{}", serde_json::to_string(&line)?);
                        } else if !args.quiet {
                            progress.println(&format!(
                                "wrote {} (seed {})",
                                path.display(),
                                job.seed
                            ));
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        progress.println(&format!(
                            "{}: item {}: failed: {e}",
                            job.source(),
                            job.index
                        ));
                    }
                }
            }
        }
    }
    progress.finish();

    let skipped = sorted.done + sorted.recovered;
    let left = plan.jobs.len() - skipped - made - failed;
    let bad_lines = plan.errors.len();
    if !args.quiet {
        let per_minute = if generating_time > Duration::ZERO {
            format!(
                ", {:.1} images/min while generating",
                made as f64 / generating_time.as_secs_f64() * 60.0
            )
        } else {
            String::new()
        };
        eprintln!(
            "{} items: {made} made, {skipped} skipped (already done), {failed} failed, {left} \
             left; {bad_lines} bad line{}; {:.1}s{per_minute}; output in {}",
            plan.jobs.len(),
            if bad_lines == 1 { "" } else { "s" },
            started.elapsed().as_secs_f64(),
            out_dir.display()
        );
    }
    if failed > 0 || bad_lines > 0 {
        bail!("{} (see above)", failures(failed, bad_lines));
    }
    if interrupted() && left > 0 {
        bail!("interrupted with {left} item(s) left; run the same command again to resume");
    }
    if stopped_by_limit && !args.quiet {
        eprintln!(
            "stopped after --max-images {limit}: run the same command again to make the other \
             {left}"
        );
    }
    Ok(())
}

/// One `--json` line: the manifest record and where the file is.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    path: String,
    #[serde(flatten)]
    record: &'a Record,
}

/// "2 items failed and 1 line could not be used", leaving out what is zero.
fn failures(items: usize, lines: usize) -> String {
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let mut parts = Vec::new();
    if items > 0 {
        parts.push(format!("{items} item{} failed", plural(items)));
    }
    if lines > 0 {
        let verb = if lines == 1 { "was" } else { "were" };
        parts.push(format!("{lines} line{} {verb} not usable", plural(lines)));
    }
    parts.join(" and ")
}

/// The `parameters` text an item's PNG carries.
fn parameters(model: &StableDiffusion, job: &Job) -> String {
    params_for(
        model,
        &job.prompt,
        &job.negative_prompt,
        &job.sampling,
        job.seed,
    )
    .to_a1111()
}

/// `--check`: prints the plan and an estimate on stdout; fails when a line or an item would.
fn check(
    args: &BatchArgs,
    model: &StableDiffusion,
    plan: &Plan,
    sorted: &Sorted,
    out_dir: &Path,
    run_seed: u64,
) -> Result<()> {
    let groups = batch::group_jobs(sorted.todo.iter().copied());
    let batches: usize = groups
        .iter()
        .map(|g| g.jobs.len().div_ceil(args.batch_size))
        .sum();
    println!(
        "{} items from {} file(s), run seed {run_seed}, output {}",
        plan.jobs.len(),
        args.files.len(),
        out_dir.display()
    );
    println!(
        "  {} to make in {} group(s), {batches} batch(es) of up to {}; {} already done; {} \
         found without a record (recorded on the next run); {} in the way; {} bad line(s)",
        sorted.todo.len(),
        groups.len(),
        args.batch_size,
        sorted.done,
        sorted.recovered,
        sorted.blocked.len(),
        plan.errors.len()
    );
    let mut probes: HashMap<(usize, usize, bool, usize), Probe> = HashMap::new();
    let mut total = Duration::ZERO;
    for (i, group) in groups.iter().enumerate() {
        let s = group.sampling();
        let b = args.batch_size.min(group.jobs.len());
        let group_batches = group.jobs.len().div_ceil(args.batch_size);
        let key = (s.width, s.height, model.uses_cfg(s.guidance), b);
        let probe = match probes.get(&key) {
            Some(p) => *p,
            None => {
                let p = batch::probe(model, s, b)?;
                probes.insert(key, p);
                p
            }
        };
        let scheduler_steps = model
            .scheduler(s.scheduler, s.steps, s.karras)?
            .timesteps()
            .len();
        let estimate = batch::estimate(&probe, scheduler_steps, group_batches, group.jobs.len());
        total += estimate;
        println!(
            "group {}: {}x{}, {} steps, {}, cfg {}, rng {}: {} item(s) in {group_batches} \
             batch(es), about {} ({:.3} s/step, decode {:.2} s per batch of {b})",
            i + 1,
            s.width,
            s.height,
            s.steps,
            batch::sampler_name(s.scheduler, s.karras),
            s.guidance,
            s.rng,
            group.jobs.len(),
            format_duration(estimate),
            probe.step_s,
            probe.decode_s,
        );
        print_items(group);
    }
    let limited = args
        .max_images
        .filter(|&m| m < sorted.todo.len())
        .map(|m| format!(" (this run stops after --max-images {m})"))
        .unwrap_or_default();
    println!(
        "estimated time: {} for {} image(s){limited}; measured here with one UNet step and one \
         decode per batch shape",
        format_duration(total),
        sorted.todo.len()
    );
    if !plan.errors.is_empty() || !sorted.blocked.is_empty() {
        bail!(
            "{} (see above)",
            failures(sorted.blocked.len(), plan.errors.len())
        );
    }
    Ok(())
}

fn print_items(group: &Group) {
    for job in &group.jobs {
        println!(
            "  {:05}  seed {:<12} {}  {}",
            job.index,
            job.seed,
            job.source(),
            one_line(&job.prompt, 60)
        );
    }
}

/// `text` on one line, cut to `max` characters with an ellipsis.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// `1h02m03s`, `4m05s` or `6.7s`.
fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        return format!("{secs:.1}s");
    }
    let s = secs.round() as u64;
    if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m{:02}s", s / 3600, (s % 3600) / 60, s % 60)
    }
}
