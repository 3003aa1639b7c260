//! The walk run: from a checked configuration to a folder of frames, its `walk.json` and its
//! animations; resumable, safe to interrupt or kill, one run per folder. The command line and a
//! server drive this same run and only decide how its events look.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{
    check_ffmpeg, check_keyframes, check_walk, claim_walk_folder, find_walk_folder, plan_frames,
    prepare_folder, preview_steps, read_record, write_animation, write_record, AnimationFormat,
    Ease, Frame, FrameRecord, Interp, Keyframe, Walk, WalkRecord, WalkSettings, PREVIEW_DIR,
};
use crate::files::{FolderLock, LockMode};
use crate::output;
use crate::pipeline::{Event, Sampling, StableDiffusion, Timings};
use crate::{Cancel, Error, Result, Setting};

/// Highest animation speed accepted: no display shows more, and GIF and WebP count frame times
/// in whole hundredths or thousandths of a second.
pub const MAX_FPS: f64 = 1000.0;

/// Where a walk's frames go.
#[derive(Debug, Clone, PartialEq)]
pub enum WalkFolder {
    /// This folder (its `preview/` subfolder for a preview).
    At(PathBuf),
    /// The newest `walk-N` under this folder holding the same walk (so the same request
    /// resumes), else a new `walk-N`.
    Under(PathBuf),
}

/// Everything a walk run needs besides the model and the sampling settings (which depend on
/// the model's defaults and are checked by [`StableDiffusion::check_sampling`]); check it with
/// [`check_config`] before loading the model.
#[derive(Debug, Clone)]
pub struct WalkConfig {
    /// The keyframes, at least two.
    pub keyframes: Vec<Keyframe>,
    /// The seeds were drawn at random rather than chosen: a walk folder found with the same walk
    /// (seeds aside) keeps its recorded seeds, so the same request resumes it.
    pub reuse_recorded_seeds: bool,
    /// Return from the last keyframe to the first.
    pub looped: bool,
    /// Timing curve within each segment.
    pub ease: Ease,
    /// How text embeddings are blended.
    pub text_interp: Interp,
    /// Render a quick draft (see [`preview_steps`]) into the folder's `preview/`.
    pub preview: bool,
    /// Frames per UNet call, at least 1.
    pub batch_size: usize,
    /// Frames per second of the animations, above 0 and at most [`MAX_FPS`].
    pub fps: f64,
    /// Animations to write; GIF is always written, first.
    pub formats: Vec<AnimationFormat>,
    /// The walk folder.
    pub folder: WalkFolder,
    /// Replace a folder holding another walk (or files in the way) instead of refusing.
    pub overwrite: bool,
    /// Wait for another run holding the folder instead of failing with [`Error::InUse`].
    pub wait: bool,
}

impl WalkConfig {
    /// GIF, then the other formats asked for, each once.
    pub fn animation_formats(&self) -> Vec<AnimationFormat> {
        let mut formats = vec![AnimationFormat::Gif];
        for f in &self.formats {
            if !formats.contains(f) {
                formats.push(*f);
            }
        }
        formats
    }

    /// The settings of the full walk with `sampling`.
    pub fn settings(&self, sampling: &Sampling) -> WalkSettings {
        WalkSettings {
            sampling: sampling.clone(),
            looped: self.looped,
            ease: self.ease,
            text_interp: self.text_interp,
        }
    }

    /// The settings of this walk's preview, whether or not this run is one (a folder holding
    /// either is this walk's): the full walk's with fewer steps (see [`preview_steps`]).
    pub fn preview_settings(&self, sampling: &Sampling) -> WalkSettings {
        let mut s = self.settings(sampling);
        s.sampling.steps = preview_steps(s.sampling.steps);
        s
    }
}

/// What a walk run reports while it works.
#[derive(Debug)]
pub enum WalkEvent {
    /// The folder is locked and prepared: `todo` of `total` frames are left to render.
    Planned {
        dir: PathBuf,
        keyframes: usize,
        total: usize,
        todo: usize,
        /// Steps each frame is rendered with, and those of the full walk (they differ in a
        /// preview).
        steps: usize,
        full_steps: usize,
        /// Scheduler steps (UNet calls per batch) per frame, for a progress bar.
        steps_per_frame: usize,
    },
    /// A batch of frames (indices into the plan) starts denoising.
    BatchStarted { frames: Vec<usize> },
    /// Progress of the pipeline itself (steps, warnings).
    Pipeline(Event),
    /// A frame file is complete on disk.
    FrameWritten(FrameWritten),
    /// An animation file is complete on disk.
    AnimationWritten { path: PathBuf },
}

/// One written frame, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct FrameWritten {
    /// Index in the plan, from 0.
    pub frame: usize,
    pub path: PathBuf,
    /// The frame's entry in `walk.json` (keyframes, times, seed, guidance), inline.
    #[serde(flatten)]
    pub record: FrameRecord,
    /// The PNG's AUTOMATIC1111 parameters text.
    pub parameters: String,
}

/// Seconds spent in each part of a walk run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalkTimings {
    /// Loading the model (filled in by the caller, which loads it).
    pub load_s: f64,
    pub render_s: f64,
    pub seconds_per_frame: f64,
    pub text_encode_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
    pub animations_s: f64,
    /// From the caller's start (filled in by the caller).
    pub total_s: f64,
}

/// How a walk run ended.
#[derive(Debug, Clone, Serialize)]
pub struct WalkSummary {
    /// The walk folder.
    pub walk: PathBuf,
    /// Frames in the walk.
    pub frames: usize,
    /// Frames rendered by this run.
    pub rendered: usize,
    /// Frames already on disk before it.
    pub skipped: usize,
    /// Animation files (empty when stopped).
    pub animations: Vec<PathBuf>,
    pub preview: bool,
    pub steps: usize,
    pub full_steps: usize,
    pub batch_size: usize,
    pub model: String,
    /// Cancelled before every frame was rendered: no animation was written; the same request
    /// resumes.
    pub stopped: bool,
    pub timings: WalkTimings,
}

impl WalkSummary {
    /// Frames on disk now.
    pub fn on_disk(&self) -> usize {
        self.skipped + self.rendered
    }
}

/// Checks `config` before any work (and before a model is loaded): batch size, speed, frame
/// counts (at most [`super::MAX_FRAMES`] in all), keyframes, and ffmpeg when MP4 is asked for.
/// Returns the frame plan.
pub fn check_config(config: &WalkConfig) -> Result<Vec<Frame>> {
    if config.batch_size == 0 {
        return Err(Error::setting(Setting::BatchSize, 0, "must be at least 1"));
    }
    let fps = config.fps;
    if !(fps.is_finite() && fps > 0.0 && fps <= MAX_FPS) {
        return Err(Error::setting(
            Setting::Fps,
            fps,
            format!("must be a number above 0 and at most {MAX_FPS}"),
        ));
    }
    let frames = plan_frames(&config.keyframes, config.looped, config.ease)?;
    check_keyframes(&config.keyframes)?;
    if config.formats.contains(&AnimationFormat::Mp4) {
        check_ffmpeg()?;
    }
    Ok(frames)
}

/// Runs the walk `config` with `model` and `sampling` (its `guidance` unused: keyframes carry
/// their own): locks the folder, keeps the frames already rendered for
/// this walk, renders the rest in batches, then writes the animations and the record. A
/// `cancel` request stops it after the batch in flight (`stopped` in the summary); a killed run
/// leaves complete frames only and resumes.
pub fn run(
    model: &StableDiffusion,
    config: &WalkConfig,
    sampling: &Sampling,
    cancel: &Cancel,
    on_event: &mut dyn FnMut(WalkEvent),
) -> Result<WalkSummary> {
    check_config(config)?;
    let full = &config.settings(sampling);
    let preview = config.preview_settings(sampling);
    let settings = if config.preview { &preview } else { full };
    check_walk(model, &config.keyframes, settings)?;
    let fps = config.fps;
    let record_for =
        |k: &[Keyframe], s: &WalkSettings| WalkRecord::new(model.name(), model.dtype(), k, s, fps);

    // 1. The folder, locked before anything in it is read or written.
    let (full_record, preview_record) = (
        record_for(&config.keyframes, full)?,
        record_for(&config.keyframes, &preview)?,
    );
    let matches = |rec: &WalkRecord, is_preview: bool| {
        let ours = if is_preview {
            &preview_record
        } else {
            &full_record
        };
        rec.same_walk(ours, config.reuse_recorded_seeds)
    };
    let lock = |dir: &Path| FolderLock::acquire(dir, LockMode::Exclusive, config.wait);
    let (root, _lock) = match &config.folder {
        WalkFolder::At(dir) => (dir.clone(), lock(dir)?),
        WalkFolder::Under(parent) => match find_walk_folder(parent, &matches)? {
            // A run doing the same walk there now holds the lock: fail (or wait) as for `At`.
            Some((dir, _)) => {
                let held = lock(&dir)?;
                (dir, held)
            }
            None => {
                let dir = claim_walk_folder(parent)?;
                let held = lock(&dir)?;
                (dir, held)
            }
        },
    };
    // Read under the lock: the record may have changed while we waited.
    let found = [(root.clone(), false), (root.join(PREVIEW_DIR), true)]
        .into_iter()
        .find_map(|(d, p)| match read_record(&d) {
            Ok(Some(rec)) if matches(&rec, p) => Some(rec),
            _ => None,
        });
    let mut keyframes = config.keyframes.clone();
    if let (true, Some(rec)) = (config.reuse_recorded_seeds, &found) {
        for (k, old) in keyframes.iter_mut().zip(&rec.keyframes) {
            k.seed = old.seed;
        }
    }
    let record = record_for(&keyframes, settings)?;
    let dir = if config.preview {
        root.join(PREVIEW_DIR)
    } else {
        root.clone()
    };
    let folder = prepare_folder(&dir, &record, config.overwrite)?;
    let total = record.frames.len();
    let todo: Vec<usize> = (0..total).filter(|&i| !folder.done[i]).collect();
    let skipped = total - todo.len();
    let steps_per_frame = model
        .scheduler(
            settings.sampling.scheduler,
            settings.sampling.steps,
            settings.sampling.karras,
        )?
        .timesteps()
        .len();
    on_event(WalkEvent::Planned {
        dir: dir.clone(),
        keyframes: keyframes.len(),
        total,
        todo: todo.len(),
        steps: settings.sampling.steps,
        full_steps: full.sampling.steps,
        steps_per_frame,
    });

    // 2. The frames still missing, batch by batch.
    let mut timings = Timings::default();
    let mut rendered = 0usize;
    let mut stopped = false;
    let render_started = Instant::now();
    if !todo.is_empty() {
        let prepare_started = Instant::now();
        let w = Walk::new(model, keyframes.clone(), settings.clone(), &mut |e| {
            on_event(WalkEvent::Pipeline(e))
        })?;
        // Text encoding of every keyframe (and drawing their noise), once per walk.
        timings.text_encode = prepare_started.elapsed();
        for batch in w.batches(&todo, config.batch_size)? {
            if cancel.is_requested() {
                stopped = true;
                break;
            }
            on_event(WalkEvent::BatchStarted {
                frames: batch.clone(),
            });
            let images = w.render(&batch, &mut timings, cancel, &mut |e| {
                on_event(WalkEvent::Pipeline(e))
            })?;
            for (&k, image) in batch.iter().zip(&images) {
                let f = &record.frames[k];
                let kf = &keyframes[f.from];
                let mut s = settings.sampling.clone();
                s.guidance = f.guidance;
                let mut params = output::GenerationParams::for_image(
                    model,
                    &kf.prompt,
                    &kf.negative_prompt,
                    &s,
                    f.seed,
                );
                params.extra.extend(w.frame_metadata(k)?);
                let parameters = params.to_a1111();
                let path = dir.join(&f.file);
                {
                    // A second Ctrl-C waits for this write: the frame is whole or absent.
                    let _writing = cancel.writing();
                    output::write_image(&path, image, &parameters, config.overwrite)
                        .map_err(|e| stopped_by(e, &dir, skipped + rendered, total))?;
                }
                rendered += 1;
                on_event(WalkEvent::FrameWritten(FrameWritten {
                    frame: k,
                    path,
                    record: f.clone(),
                    parameters,
                }));
            }
        }
    }
    let render_time = render_started.elapsed();
    let mut summary = WalkSummary {
        walk: dir.clone(),
        frames: total,
        rendered,
        skipped,
        animations: Vec::new(),
        preview: config.preview,
        steps: settings.sampling.steps,
        full_steps: full.sampling.steps,
        batch_size: config.batch_size,
        model: model.name().to_string(),
        stopped: stopped && skipped + rendered < total,
        timings: WalkTimings {
            render_s: render_time.as_secs_f64(),
            seconds_per_frame: per_frame(render_time, rendered),
            text_encode_s: timings.text_encode.as_secs_f64(),
            denoise_s: timings.denoise.as_secs_f64(),
            decode_s: timings.decode.as_secs_f64(),
            ..WalkTimings::default()
        },
    };
    if summary.stopped {
        return Ok(summary);
    }

    // 3. Animations from the frame files: they hold every frame, rendered now or before.
    let animations_started = Instant::now();
    let mut written = Vec::new();
    for format in config.animation_formats() {
        let name = format.file_name();
        let path = dir.join(&name);
        let still_valid = todo.is_empty() && folder.animations.contains(&name) && path.is_file();
        if !still_valid {
            write_animation(format, &dir, total, fps, &path)
                .map_err(|e| stopped_by(e, &dir, total, total))?;
            on_event(WalkEvent::AnimationWritten { path: path.clone() });
        }
        written.push(name);
        summary.animations.push(path);
    }
    summary.timings.animations_s = animations_started.elapsed().as_secs_f64();
    let final_record = WalkRecord {
        animations: written,
        ..record
    };
    write_record(&dir, &final_record).map_err(|e| stopped_by(e, &dir, total, total))?;
    Ok(summary)
}

/// A full disk stops the walk with how much of it is on disk; other errors pass unchanged.
fn stopped_by(e: Error, dir: &Path, done: usize, total: usize) -> Error {
    if e.is_disk_full() {
        Error::Stopped {
            path: dir.to_path_buf(),
            done,
            total,
            source: Box::new(e),
        }
    } else {
        e
    }
}

fn per_frame(time: Duration, frames: usize) -> f64 {
    if frames == 0 {
        0.0
    } else {
        time.as_secs_f64() / frames as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_stops_the_walk_saying_what_is_on_disk() {
        let dir = Path::new("out/walk-1");
        let full = Error::io(
            dir.join("frame-00003.png"),
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        );
        let e = stopped_by(full, dir, 3, 8);
        assert!(e.is_disk_full(), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("no space left")
                && text.contains("3 of 8 frames on disk in out/walk-1")
                && !text.contains("--"),
            "{text}"
        );
        // Other errors pass unchanged.
        let other = stopped_by(Error::InvalidInput("bad".into()), dir, 3, 8);
        assert_eq!(other.to_string(), "bad");
    }

    #[test]
    fn config_checks_come_before_work() {
        let kf = |frames| Keyframe {
            prompt: "p".into(),
            negative_prompt: String::new(),
            seed: 1,
            frames,
            guidance: 7.5,
        };
        let config = WalkConfig {
            keyframes: vec![kf(Some(2)), kf(None)],
            reuse_recorded_seeds: false,
            looped: false,
            ease: Ease::Linear,
            text_interp: Interp::Lerp,
            preview: false,
            batch_size: 1,
            fps: 12.0,
            formats: vec![],
            folder: WalkFolder::At(PathBuf::from("unused")),
            overwrite: false,
            wait: false,
        };
        assert_eq!(check_config(&config).unwrap().len(), 3);
        let setting_of = |c: &WalkConfig| match check_config(c) {
            Err(Error::Setting { setting, .. }) => Some(setting),
            _ => None,
        };
        let bad_batch = WalkConfig {
            batch_size: 0,
            ..config.clone()
        };
        assert_eq!(setting_of(&bad_batch), Some(Setting::BatchSize));
        for fps in [0.0, -1.0, f64::NAN, 1000.5] {
            let bad = WalkConfig {
                fps,
                ..config.clone()
            };
            assert_eq!(setting_of(&bad), Some(Setting::Fps), "{fps}");
        }
        let huge = WalkConfig {
            keyframes: vec![kf(Some(100_000_000)), kf(None)],
            ..config.clone()
        };
        assert_eq!(setting_of(&huge), Some(Setting::Frames));
        let over = WalkConfig {
            keyframes: vec![kf(Some(60_000)), kf(Some(60_000)), kf(None)],
            ..config
        };
        assert_eq!(setting_of(&over), Some(Setting::Frames));
    }
}
