//! `latent walk`: keyframes in, a folder of frames, `walk.json` and animations out; resumable.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use latent::output;
use latent::pipeline::{Event, Residency, Timings};
use latent::walk::{self, AnimationFormat, FileDefaults, Keyframe, Walk, WalkRecord, WalkSettings};

use super::{load_model, params_for, random_seed, sampling_for};
use crate::cli::WalkArgs;
use crate::progress::Progress;

/// Frames between keyframes when neither `--frames` nor the keyframe file says.
const DEFAULT_FRAMES: usize = 24;

/// Folder that holds walks when `-o` is not given.
const OUTPUTS: &str = "outputs";

/// `latent walk`.
pub fn walk(args: WalkArgs) -> Result<()> {
    let started = Instant::now();
    // Cheap checks first: a bad flag or keyframe file fails before the model loads.
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !(args.fps.is_finite() && args.fps > 0.0 && args.fps <= 1000.0) {
        bail!(
            "--fps {}: must be a number above 0 and at most 1000",
            args.fps
        );
    }
    if args.frames == Some(0) {
        bail!("--frames must be at least 1");
    }
    let mut formats = vec![AnimationFormat::Gif];
    for f in &args.formats {
        if !formats.contains(f) {
            formats.push(*f);
        }
    }
    if formats.contains(&AnimationFormat::Mp4) {
        walk::check_ffmpeg()?;
    }
    let s = &args.sampling;
    let (mut keyframes, seeds_given) = match &args.keyframes {
        Some(path) => {
            let defaults = FileDefaults {
                frames: args.frames,
                negative_prompt: s.negative_prompt.clone(),
                guidance: s.guidance,
            };
            (
                walk::read_keyframe_file(path, &defaults, args.looped)?,
                true,
            )
        }
        None => {
            let given = !args.seeds.is_empty();
            let seeds = if given {
                args.seeds.clone()
            } else {
                vec![random_seed()]
            };
            let mut k = walk::keyframes_from_flags(
                &args.prompts,
                &seeds,
                args.frames.unwrap_or(DEFAULT_FRAMES),
                &s.negative_prompt,
                s.guidance,
            )?;
            // As in a keyframe file: the last keyframe of a walk that does not loop leads
            // nowhere, and walk.json says so.
            if !args.looped {
                if let Some(last) = k.last_mut() {
                    last.frames = None;
                }
            }
            (k, given)
        }
    };
    walk::plan_frames(&keyframes, args.looped, args.ease)?;

    let mut progress = Progress::new(args.quiet);
    let model = load_model(&args.model, Residency::Resident, &mut progress)?;
    progress.finish();
    let load_time = started.elapsed();
    let full = WalkSettings {
        sampling: sampling_for(&model, &args.sampling)?,
        looped: args.looped,
        ease: args.ease,
        text_interp: args.text_interp,
    };
    let mut preview = full.clone();
    preview.sampling.steps = walk::preview_steps(full.sampling.steps);
    let settings = if args.preview { &preview } else { &full };
    walk::check_walk(&model, &keyframes, settings)?;
    let record_for = |k: &[Keyframe], s: &WalkSettings| {
        WalkRecord::new(model.name(), model.dtype(), k, s, args.fps)
    };

    // The walk folder: -o, else the newest outputs/walk-N holding this walk (so the same command
    // resumes), else a new one. Without --seed, the seed recorded there is reused.
    let (full_record, preview_record) = (
        record_for(&keyframes, &full)?,
        record_for(&keyframes, &preview)?,
    );
    let matches = |rec: &WalkRecord, is_preview: bool| {
        let ours = if is_preview {
            &preview_record
        } else {
            &full_record
        };
        rec.same_walk(ours, !seeds_given)
    };
    let (root, found) = match &args.output {
        Some(dir) => {
            let found = [(dir.clone(), false), (dir.join(walk::PREVIEW_DIR), true)]
                .into_iter()
                .find_map(|(d, p)| match walk::read_record(&d) {
                    Ok(Some(rec)) if matches(&rec, p) => Some(rec),
                    _ => None,
                });
            (dir.clone(), found)
        }
        None => match walk::find_walk_folder(Path::new(OUTPUTS), &matches)? {
            Some((dir, rec)) => (dir, Some(rec)),
            None => (walk::next_walk_folder(Path::new(OUTPUTS))?, None),
        },
    };
    if let (false, Some(rec)) = (seeds_given, &found) {
        for (k, old) in keyframes.iter_mut().zip(&rec.keyframes) {
            k.seed = old.seed;
        }
    }
    let record = record_for(&keyframes, settings)?;
    let dir = if args.preview {
        root.join(walk::PREVIEW_DIR)
    } else {
        root.clone()
    };
    let folder = walk::prepare_folder(&dir, &record, args.overwrite)?;
    let todo: Vec<usize> = (0..record.frames.len())
        .filter(|&i| !folder.done[i])
        .collect();
    let total = record.frames.len();
    if !args.quiet && !args.json {
        let kept = total - todo.len();
        let what = if args.preview {
            "preview of walk"
        } else {
            "walk"
        };
        eprintln!(
            "{what}: {} keyframes, {total} frames ({kept} on disk, {} to render) in {}",
            keyframes.len(),
            todo.len(),
            dir.display()
        );
        if args.preview {
            eprintln!(
                "preview: {} steps instead of {}; run again without --preview for the full walk",
                settings.sampling.steps, full.sampling.steps
            );
        }
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    let mut timings = Timings::default();
    let mut rendered = 0usize;
    let render_started = Instant::now();
    if !todo.is_empty() {
        let flag = interrupted.clone();
        // A second Ctrl-C quits at once: frame files are written atomically, so even then no
        // partial frame is left (a hidden temporary file at most, removed by the next run).
        let handler = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping after the current batch (Ctrl-C again to quit now)");
        });
        if let Err(e) = handler {
            progress.println(&format!(
                "warning: cannot catch Ctrl-C ({e}); interrupting may lose the batch in flight"
            ));
        }

        let mut bar = FrameBar::new(args.quiet);
        let prepare_started = Instant::now();
        let w = Walk::new(&model, keyframes.clone(), settings.clone(), &mut |e| {
            bar.event(e)
        })?;
        // Text encoding of every keyframe (and drawing their noise), once per walk.
        timings.text_encode = prepare_started.elapsed();
        let per_frame = model
            .scheduler(
                settings.sampling.scheduler,
                settings.sampling.steps,
                settings.sampling.karras,
            )?
            .timesteps()
            .len();
        bar.start(todo.len(), per_frame, total);
        for batch in w.batches(&todo, args.batch_size)? {
            if interrupted.load(Ordering::SeqCst) {
                break;
            }
            bar.label(&batch);
            let images = w.render(&batch, &mut timings, &mut |e| bar.event(e))?;
            for (&k, image) in batch.iter().zip(&images) {
                let f = &record.frames[k];
                let kf = &keyframes[f.from];
                let mut s = settings.sampling.clone();
                s.guidance = f.guidance;
                let mut params = params_for(&model, &kf.prompt, &kf.negative_prompt, &s, f.seed);
                params.extra.extend(w.frame_metadata(k)?);
                let path = dir.join(&f.file);
                output::write_png(
                    &path,
                    &image.rgb,
                    image.width as u32,
                    image.height as u32,
                    &params.to_a1111(),
                    args.overwrite,
                )?;
                rendered += 1;
                if args.json {
                    let line = serde_json::json!({
                        "frame": k,
                        "path": path,
                        "from": f.from,
                        "to": f.to,
                        "t": f.t,
                        "eased_t": f.eased_t,
                        "seed": f.seed,
                        "guidance": f.guidance,
                        "parameters": params.to_a1111(),
                    });
                    println!("{line}");
                }
            }
        }
        bar.finish();
    }
    let render_time = render_started.elapsed();
    if interrupted.load(Ordering::SeqCst) && rendered < todo.len() {
        bail!(
            "interrupted: {} of {total} frames are on disk in {}; run the same command again to \
             render the rest",
            total - todo.len() + rendered,
            dir.display()
        );
    }

    // Animations from the frame files: they hold every frame, rendered now or before.
    let animations_started = Instant::now();
    let mut written = Vec::new();
    for format in &formats {
        let name = format.file_name();
        let path = dir.join(&name);
        let still_valid = todo.is_empty() && folder.animations.contains(&name) && path.is_file();
        if !still_valid {
            walk::write_animation(*format, &dir, total, args.fps, &path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        written.push(name);
    }
    let animations_time = animations_started.elapsed();
    let mut final_record = record.clone();
    final_record.animations = written.clone();
    walk::write_record(&dir, &final_record)?;

    let seconds_per_frame = if rendered > 0 {
        render_time.as_secs_f64() / rendered as f64
    } else {
        0.0
    };
    if args.json {
        let summary = serde_json::json!({
            "walk": dir,
            "frames": total,
            "rendered": rendered,
            "skipped": total - todo.len(),
            "animations": written.iter().map(|n| dir.join(n)).collect::<Vec<PathBuf>>(),
            "preview": args.preview,
            "steps": settings.sampling.steps,
            "batch_size": args.batch_size,
            "model": model.name(),
            "timings": {
                "load_s": load_time.as_secs_f64(),
                "render_s": render_time.as_secs_f64(),
                "seconds_per_frame": seconds_per_frame,
                "text_encode_s": timings.text_encode.as_secs_f64(),
                "denoise_s": timings.denoise.as_secs_f64(),
                "decode_s": timings.decode.as_secs_f64(),
                "animations_s": animations_time.as_secs_f64(),
                "total_s": started.elapsed().as_secs_f64(),
            },
        });
        println!("{summary}");
    } else if !args.quiet {
        eprintln!(
            "wrote {} ({rendered} frames rendered at {seconds_per_frame:.2}s/frame, {} kept) and {} in {:.1}s",
            dir.display(),
            total - todo.len(),
            written.join(", "),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// One bar over every frame x step still to render, with an ETA.
struct FrameBar {
    quiet: bool,
    bar: Option<ProgressBar>,
    total: usize,
}

impl FrameBar {
    fn new(quiet: bool) -> Self {
        FrameBar {
            quiet,
            bar: None,
            total: 0,
        }
    }

    /// `frames` to render at `steps` each, out of `total` frames in the walk.
    fn start(&mut self, frames: usize, steps: usize, total: usize) {
        self.total = total;
        if self.quiet {
            return;
        }
        let bar = ProgressBar::with_draw_target(
            Some((frames * steps) as u64),
            ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} frame-steps {elapsed_precise} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        self.bar = Some(bar);
    }

    /// Names the frames of the batch in flight.
    fn label(&self, batch: &[usize]) {
        let Some(bar) = &self.bar else { return };
        let (first, last) = match (batch.first(), batch.last()) {
            (Some(&f), Some(&l)) => (f + 1, l + 1),
            _ => return,
        };
        bar.set_message(if first == last {
            format!("frame {first} of {}", self.total)
        } else if last - first + 1 == batch.len() {
            format!("frames {first}-{last} of {}", self.total)
        } else {
            format!("{} frames of {} from {first}", batch.len(), self.total)
        });
    }

    fn event(&mut self, event: Event) {
        match event {
            // One step of a batch advances every frame in it.
            Event::Step { batch, .. } => {
                if let Some(bar) = &self.bar {
                    bar.inc(batch as u64);
                }
            }
            Event::Warning(w) => match &self.bar {
                Some(bar) => bar.suspend(|| eprintln!("warning: {w}")),
                None => eprintln!("warning: {w}"),
            },
            _ => {}
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
