//! `latent walk`: builds a walk run from the flags, shows its progress, prints its summary.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use latent::pipeline::Residency;
use latent::walk::{self, FileDefaults, WalkConfig, WalkEvent, WalkFolder};
use latent::Cancel;

use super::{load_model, random_seed, sampling_for, stop_on_ctrl_c};
use crate::cli::WalkArgs;
use crate::progress::{FrameBar, Progress};

/// Frames between keyframes when neither `--frames` nor the keyframe file says.
const DEFAULT_FRAMES: usize = 24;

/// Folder that holds walks when `-o` is not given.
const OUTPUTS: &str = "outputs";

/// `latent walk`.
pub fn walk(args: WalkArgs) -> Result<()> {
    let started = Instant::now();
    let s = &args.sampling;
    let (keyframes, seeds_given) = match &args.keyframes {
        Some(path) => {
            let defaults = FileDefaults {
                frames: args.frames,
                negative_prompt: s.negative_prompt.clone(),
                guidance: s.guidance,
            };
            let k = walk::read_keyframe_file(path, &defaults, args.looped)?;
            (k, true)
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
    let config = WalkConfig {
        keyframes,
        reuse_recorded_seeds: !seeds_given,
        looped: args.looped,
        ease: args.ease,
        text_interp: args.text_interp,
        preview: args.preview,
        batch_size: args.batch_size,
        fps: args.fps,
        formats: args.formats.clone(),
        folder: match &args.output {
            Some(dir) => WalkFolder::At(dir.clone()),
            None => WalkFolder::Under(PathBuf::from(OUTPUTS)),
        },
        overwrite: args.overwrite,
        wait: args.wait,
    };
    // Cheap checks first: a bad flag or keyframe file fails before the model loads.
    walk::check_config(&config)?;

    let mut progress = Progress::new(args.quiet);
    let model = load_model(&args.model, Residency::Resident, &mut progress)?;
    progress.finish();
    let load_time = started.elapsed();
    let sampling = sampling_for(&model, &args.sampling)?;

    let cancel = Cancel::new();
    stop_on_ctrl_c(&cancel, &progress);
    let talk = !args.quiet && !args.json;
    let mut bar = FrameBar::new(args.quiet);
    let mut on_event = |event: WalkEvent| match event {
        WalkEvent::Planned {
            dir,
            keyframes,
            total,
            todo,
            steps,
            full_steps,
            steps_per_frame,
        } => {
            if talk {
                let what = if args.preview {
                    "preview of walk"
                } else {
                    "walk"
                };
                eprintln!(
                    "{what}: {keyframes} keyframes, {total} frames ({} on disk, {todo} to render) \
                     in {}",
                    total - todo,
                    dir.display()
                );
                if args.preview {
                    eprintln!(
                        "preview: {steps} steps instead of {full_steps}; run again without \
                         --preview for the full walk"
                    );
                }
            }
            if todo > 0 {
                bar.start(todo, steps_per_frame, total);
            }
        }
        WalkEvent::BatchStarted { frames } => bar.label(&frames),
        WalkEvent::Pipeline(e) => bar.event(e),
        WalkEvent::FrameWritten(frame) => {
            if args.json {
                print_json(&frame);
            }
        }
        WalkEvent::AnimationWritten { .. } => bar.finish(),
    };
    let result = walk::run(&model, &config, &sampling, &cancel, &mut on_event);
    bar.finish();
    let mut summary = result?;
    if summary.stopped {
        bail!(
            "interrupted: {} of {} frames are on disk in {}; run the same command again to \
             render the rest",
            summary.on_disk(),
            summary.frames,
            summary.walk.display()
        );
    }
    summary.timings.load_s = load_time.as_secs_f64();
    summary.timings.total_s = started.elapsed().as_secs_f64();
    if args.json {
        print_json(&summary);
    } else if !args.quiet {
        let names: Vec<String> = summary
            .animations
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        eprintln!(
            "wrote {} ({} frames rendered at {:.2}s/frame, {} kept) and {} in {:.1}s",
            summary.walk.display(),
            summary.rendered,
            summary.timings.seconds_per_frame,
            summary.skipped,
            names.join(", "),
            summary.timings.total_s
        );
    }
    Ok(())
}

/// One JSON line on stdout (typed values always serialize; a failure would be a bug, reported
/// rather than hidden). A reader that went away (`| head`) does not stop the walk: its frames
/// are on disk either way.
fn print_json(value: &impl serde::Serialize) {
    use std::io::Write;
    match serde_json::to_string(value) {
        Ok(line) => {
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
        Err(e) => eprintln!("warning: cannot write JSON: {e}"),
    }
}
