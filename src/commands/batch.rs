//! `latent batch`: prompt files in; one folder of PNGs and a manifest out. The library plans and
//! runs the batch (`latent::batch::Batch`); this command turns flags into its settings, draws
//! progress, wires Ctrl-C and prints the report.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use latent::batch::{
    self, Access, Batch, BatchConfig, BatchEvent, CheckReport, Record, Shard, Stop,
};
use latent::pipeline::Residency;
use latent::Cancel;

use super::{load_model, random_seed, sampling_for, stop_on_ctrl_c};
use crate::cli::BatchArgs;
use crate::progress::Progress;

/// `outputs/<stem of the first prompt file>`: the same command finds its own folder again.
fn default_output(first: &Path) -> PathBuf {
    let stem = first
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty() && s != "." && s != "..")
        .unwrap_or_else(|| "batch".into());
    Path::new("outputs").join(stem)
}

/// `latent batch`.
pub fn batch(args: BatchArgs) -> Result<()> {
    if let Some(dir) = &args.merge {
        let report = batch::merge(dir, args.wait)?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else if !args.quiet {
            eprintln!(
                "merged {} manifest file(s) into {}: {} record(s), {} duplicate(s) dropped",
                report.files.len(),
                report.manifest.display(),
                report.records,
                report.duplicates
            );
        }
        return Ok(());
    }
    let shard = match &args.shard {
        Some(text) => Some(Shard::parse(text, &|name| std::env::var(name).ok())?),
        None => None,
    };
    let config = BatchConfig {
        out_dir: match &args.output {
            Some(dir) => dir.clone(),
            None => default_output(&args.files[0]),
        },
        seed: args.seed,
        new_seed: random_seed(),
        repeat: args.repeat,
        batch_size: args.batch_size,
        max_images: args.max_images,
        template: args.filename.parse()?,
        overwrite: args.overwrite,
        wait: args.wait,
        shard,
    };
    // Settings and whole-file problems (missing, not UTF-8, empty) stop before the model loads.
    config.validate()?;
    let files = args
        .files
        .iter()
        .map(|p| batch::read_prompt_file(p, args.format))
        .collect::<latent::Result<Vec<_>>>()?;

    let mut progress = Progress::new(args.quiet);
    let model = load_model(&args.model, Residency::Resident, &mut progress)?;
    let sampling = sampling_for(&model, &args.sampling)?;
    let access = if args.check {
        Access::Read
    } else {
        Access::Write
    };
    let prepared = Batch::prepare(
        &model,
        config,
        &files,
        &args.sampling.negative_prompt,
        sampling,
        access,
    )?;
    for line in prepared.warnings() {
        progress.println(line);
    }
    for e in prepared.line_errors() {
        progress.println(&e.to_string());
    }
    for line in prepared.blocked() {
        progress.println(line);
    }
    if args.check {
        let report = prepared.check()?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", format_check(&report, &prepared, args.files.len()));
        }
        if report.has_problems() {
            bail!("{} (see above)", failures(report.blocked, report.bad_lines));
        }
        return Ok(());
    }

    let cancel = Cancel::new();
    stop_on_ctrl_c(&cancel, &progress);
    let (json, quiet) = (args.json, args.quiet);
    let summary = prepared.run(&cancel, &mut |event| match event {
        BatchEvent::Started { items, .. } => progress.start_items(items as u64),
        BatchEvent::BatchStarted { number, of, images } => progress.start_batch(&format!(
            "batch {number}/{of} ({images} image{})",
            if images == 1 { "" } else { "s" }
        )),
        BatchEvent::Pipeline(e) => progress.event(e),
        BatchEvent::Written { path, record } => {
            progress.items_done(1);
            if json {
                match serde_json::to_string(&JsonLine { path, record }) {
                    Ok(line) => println!("{line}"),
                    Err(e) => progress.println(&format!("warning: --json: {e}")),
                }
            } else if !quiet {
                progress.println(&format!("wrote {} (seed {})", path.display(), record.seed));
            }
        }
        // Only runs prepared with Access::Memory keep images in memory; this one writes.
        BatchEvent::Made { .. } => progress.items_done(1),
        BatchEvent::Failed { job, error } => {
            progress.items_done(1);
            progress.println(&format!(
                "{}: item {}: failed: {}",
                job.source(),
                job.index,
                crate::cli::describe(error)
            ));
        }
    })?;
    progress.finish();

    let s = &summary;
    if !quiet {
        let per_minute = if s.generating_s > 0.0 {
            format!(
                ", {:.1} images/min while generating",
                s.made as f64 / s.generating_s * 60.0
            )
        } else {
            String::new()
        };
        eprintln!(
            "{} items: {} made, {} skipped (already done), {} failed, {} left; {} bad line{}; \
             {:.1}s{per_minute}; output in {}",
            s.items,
            s.made,
            s.skipped,
            s.failed,
            s.left,
            s.bad_lines,
            if s.bad_lines == 1 { "" } else { "s" },
            s.elapsed_s,
            s.out_dir.display()
        );
    }
    match &s.stop {
        Stop::DiskFull(message) => bail!(
            "stopped: {message}; {} made, {} left; free some space and run the same command \
             again to resume",
            s.made,
            s.items - s.skipped - s.made
        ),
        _ if s.failed > 0 || s.bad_lines > 0 => {
            bail!("{} (see above)", failures(s.failed, s.bad_lines))
        }
        Stop::Cancelled if s.left > 0 => bail!(
            "interrupted with {} item(s) left; run the same command again to resume",
            s.left
        ),
        Stop::Limit(limit) if !quiet => eprintln!(
            "stopped after --max-images {limit}: run the same command again to make the other {}",
            s.left
        ),
        _ => {}
    }
    Ok(())
}

/// One `--json` line: the manifest record and where the file is.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    path: &'a Path,
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

/// `--check`'s report as text: the plan, each group with its items, and the estimate.
fn format_check(report: &CheckReport, prepared: &Batch, files: usize) -> String {
    let mut out = format!(
        "{} items from {files} file(s), run seed {}, output {}\n",
        report.items,
        report.run_seed,
        prepared.config().out_dir.display()
    );
    out += &format!(
        "  {} to make in {} group(s), {} batch(es) of up to {}; {} already done; {} found \
         without a record (recorded on the next run); {} in the way; {} bad line(s)\n",
        report.to_make,
        report.groups.len(),
        report.batches,
        report.batch_size,
        report.done,
        report.recovered,
        report.blocked,
        report.bad_lines
    );
    for (i, g) in report.groups.iter().enumerate() {
        out += &format!(
            "group {}: {}x{}, {} steps, {}, cfg {}, rng {}: {} item(s) in {} batch(es), about {} \
             ({:.3} s/step, decode {:.2} s per batch of {})\n",
            i + 1,
            g.width,
            g.height,
            g.steps,
            g.sampler,
            g.guidance,
            g.rng,
            g.items.len(),
            g.batches,
            format_duration(g.estimate_s),
            g.step_s,
            g.decode_s,
            g.batch_size
        );
        for item in &g.items {
            out += &format!(
                "  {:05}  seed {:<12} {}  {}\n",
                item.index,
                item.seed,
                item.source,
                one_line(&item.prompt, 60)
            );
        }
    }
    let limited = report
        .max_images
        .filter(|&m| m < report.to_make)
        .map(|m| format!(" (this run stops after --max-images {m})"))
        .unwrap_or_default();
    out += &format!(
        "estimated time: {} for {} image(s){limited}; measured here with one UNet step and one \
         decode per batch shape\n",
        format_duration(report.estimate_s),
        report.to_make
    );
    out
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
fn format_duration(secs: f64) -> String {
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
