//! The walk record, `walk.json`: keyframes, settings and the frame plan, and what makes two
//! records the same walk (the resume logic that uses it is in `folder.rs`).
//!
//! Invariant: every frame file in a walk folder was rendered from the plan in its `walk.json`.
//! [`super::prepare_folder`] keeps it by deleting (only with `--overwrite`) any frame the new plan
//! would change before it writes the new record, and frames are written atomically after it.
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::{frame_file_name, frame_guidance, plan_frames, Keyframe, WalkSettings};
use crate::files::{self, Replace};
use crate::{Error, Result};

/// Name of the record inside a walk folder.
pub const RECORD_FILE: &str = "walk.json";

/// Format tag written into every record; a record with another tag is not read as ours.
const FORMAT: &str = "latent-walk/1";

/// Subfolder of a walk folder that holds its `--preview` render.
pub const PREVIEW_DIR: &str = "preview";

/// What `walk.json` holds: enough to re-render the walk, extend it, or check frames on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalkRecord {
    /// Always `latent-walk/1`.
    pub format: String,
    /// Model name, as in the frames' metadata.
    pub model: String,
    /// Weights and activations dtype (`f32`, `f16`, `bf16`).
    pub dtype: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler: String,
    pub karras: bool,
    pub rng: String,
    /// Always `slerp`.
    pub noise_interp: String,
    pub text_interp: String,
    pub ease: String,
    #[serde(rename = "loop")]
    pub looped: bool,
    /// Playback speed of the animations.
    pub fps: f64,
    /// Animation files written for the frames on disk (`walk.gif`, ...).
    #[serde(default)]
    pub animations: Vec<String>,
    pub keyframes: Vec<Keyframe>,
    pub frames: Vec<FrameRecord>,
}

/// One planned frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameRecord {
    /// File name in the walk folder.
    pub file: String,
    /// Keyframe indices (from 0) of the segment.
    pub from: usize,
    pub to: usize,
    /// Linear and eased time in the segment.
    pub t: f64,
    pub eased_t: f64,
    /// Seed of the per-step noise (the `from` keyframe's).
    pub seed: u64,
    pub guidance: f64,
}

/// The keyframe content a frame's pixels depend on (its frame count does not matter).
#[derive(Debug, PartialEq)]
struct KeyframeContent<'a> {
    prompt: &'a str,
    negative_prompt: &'a str,
    seed: u64,
    guidance: u64,
}

impl<'a> KeyframeContent<'a> {
    fn of(k: &'a Keyframe) -> Self {
        KeyframeContent {
            prompt: &k.prompt,
            negative_prompt: &k.negative_prompt,
            seed: k.seed,
            guidance: k.guidance.to_bits(),
        }
    }
}

/// Everything frame `i`'s pixels depend on besides the render settings. At eased time 0 a
/// frame is its `from` keyframe alone, so the `to` keyframe is left out: the closing frame of a
/// walk equals the first frame of the segment that extends it.
#[derive(Debug, PartialEq)]
pub(super) struct FrameKey<'a> {
    file: &'a str,
    from: KeyframeContent<'a>,
    to: Option<KeyframeContent<'a>>,
    eased_t: u64,
}

impl WalkRecord {
    /// The record of a walk through `keyframes` with `settings`, on model `model` in `dtype`.
    pub fn new(
        model: &str,
        dtype: DType,
        keyframes: &[Keyframe],
        settings: &WalkSettings,
        fps: f64,
    ) -> Result<Self> {
        let plan = plan_frames(keyframes, settings.looped, settings.ease)?;
        let s = &settings.sampling;
        Ok(WalkRecord {
            format: FORMAT.into(),
            model: model.into(),
            dtype: format!("{dtype:?}").to_lowercase(),
            width: s.width,
            height: s.height,
            steps: s.steps,
            scheduler: s.scheduler.to_string(),
            karras: s.karras,
            rng: s.rng.to_string(),
            noise_interp: "slerp".into(),
            text_interp: settings.text_interp.to_string(),
            ease: settings.ease.to_string(),
            looped: settings.looped,
            fps,
            animations: Vec::new(),
            keyframes: keyframes.to_vec(),
            frames: plan
                .iter()
                .map(|f| FrameRecord {
                    file: frame_file_name(f.index),
                    from: f.from,
                    to: f.to,
                    t: f.t,
                    eased_t: f.eased,
                    seed: keyframes[f.from].seed,
                    guidance: frame_guidance(keyframes, f),
                })
                .collect(),
        })
    }

    /// Settings that change every frame, by name.
    fn render_settings(&self) -> [(&'static str, String); 10] {
        [
            ("model", self.model.clone()),
            ("dtype", self.dtype.clone()),
            ("width", self.width.to_string()),
            ("height", self.height.to_string()),
            ("steps", self.steps.to_string()),
            ("scheduler", self.scheduler.clone()),
            ("karras", self.karras.to_string()),
            ("rng", self.rng.clone()),
            ("noise interpolation", self.noise_interp.clone()),
            ("text interpolation", self.text_interp.clone()),
        ]
    }

    /// The first render setting that differs from `other`'s, as `name: ours vs theirs`.
    pub fn render_difference(&self, other: &WalkRecord) -> Option<String> {
        self.render_settings()
            .into_iter()
            .zip(other.render_settings())
            .find(|(a, b)| a.1 != b.1)
            .map(|((name, ours), (_, theirs))| format!("{name} {theirs}, now {ours}"))
    }

    /// Whether `other` is the same walk: render settings, loop, ease and keyframes (seeds
    /// too unless `ignore_seeds`).
    pub fn same_walk(&self, other: &WalkRecord, ignore_seeds: bool) -> bool {
        let keyframe_eq = |a: &Keyframe, b: &Keyframe| {
            a.prompt == b.prompt
                && a.negative_prompt == b.negative_prompt
                && a.frames == b.frames
                && a.guidance.to_bits() == b.guidance.to_bits()
                && (ignore_seeds || a.seed == b.seed)
        };
        self.format == other.format
            && self.render_difference(other).is_none()
            && self.looped == other.looped
            && self.ease == other.ease
            && self.keyframes.len() == other.keyframes.len()
            && self
                .keyframes
                .iter()
                .zip(&other.keyframes)
                .all(|(a, b)| keyframe_eq(a, b))
    }

    pub(super) fn frame_key(&self, i: usize) -> Option<FrameKey<'_>> {
        let f = self.frames.get(i)?;
        let from = self.keyframes.get(f.from)?;
        let to = self.keyframes.get(f.to)?;
        Some(FrameKey {
            file: &f.file,
            from: KeyframeContent::of(from),
            to: (f.eased_t != 0.0).then(|| KeyframeContent::of(to)),
            eased_t: f.eased_t.to_bits(),
        })
    }
}

/// Reads `dir/walk.json`: `Ok(None)` when there is none, an error when it exists but is not a
/// walk record.
pub fn read_record(dir: &Path) -> Result<Option<WalkRecord>> {
    let path = dir.join(RECORD_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let record: WalkRecord = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if record.format != FORMAT {
        return Err(Error::Json {
            path,
            message: format!("format `{}`, expected `{FORMAT}`", record.format),
        });
    }
    Ok(Some(record))
}

/// Writes `dir/walk.json` atomically.
pub fn write_record(dir: &Path, record: &WalkRecord) -> Result<()> {
    let path = dir.join(RECORD_FILE);
    let json = serde_json::to_string_pretty(record).map_err(|e| Error::Json {
        path: path.clone(),
        message: e.to_string(),
    })?;
    files::write_atomic(&path, Replace::Overwrite, |file, tmp| {
        file.write_all(format!("{json}\n").as_bytes())
            .map_err(|e| Error::io(tmp, e))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn frame_times_read_back_bit_equal() {
        // Resume compares each frame's eased t bit for bit with walk.json: the JSON reader
        // must give back exactly the f64 that was written (serde_json's float_roundtrip).
        for n in 1..64u32 {
            for i in 0..n {
                let t = i as f64 / n as f64;
                for x in [t, t * t * (3.0 - 2.0 * t)] {
                    let back: f64 =
                        serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
                    assert_eq!(back.to_bits(), x.to_bits(), "{x}");
                }
            }
        }
    }
}
