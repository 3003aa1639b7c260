//! The manifest of finished images (one JSON record per line) and resume: which items are
//! done, and what is at an unrecorded item's file.
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::prompt::PromptSyntax;
use serde::{Deserialize, Serialize};

use crate::pipeline::Timings;
use crate::{Error, Result};

use super::plan::{Job, SeedFrom};
use super::prompt_file::sampler_name;

/// File name of the manifest inside the output folder.
pub const MANIFEST_NAME: &str = "manifest.jsonl";

/// Guidance in millionths, so a value read back from JSON compares equal to the one written.
pub(super) fn cfg_micros(cfg: f64) -> i64 {
    (cfg * 1e6).round() as i64
}

/// Stage times of the batch that made an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordTimings {
    pub text_encode_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
    pub seconds_per_step: f64,
    /// The image's share of its batch: (encode + denoise + decode) / images in the batch.
    pub image_s: f64,
}

impl RecordTimings {
    /// The share of one image in a batch of `images` that took `t`.
    pub fn from_batch(t: &Timings, images: usize) -> Self {
        let total = t.text_encode + t.denoise + t.decode;
        RecordTimings {
            text_encode_s: t.text_encode.as_secs_f64(),
            denoise_s: t.denoise.as_secs_f64(),
            decode_s: t.decode.as_secs_f64(),
            seconds_per_step: t.seconds_per_step(),
            image_s: total.as_secs_f64() / images.max(1) as f64,
        }
    }
}

/// One line of the manifest: a finished image, everything needed to make it again, and what it
/// cost. Field names follow the prompt-file options where there is one (`cfg_scale`,
/// `sampler_name`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The PNG, relative to the output folder, `/`-separated.
    pub file: String,
    pub index: usize,
    /// `file:line` of the prompt line.
    pub source: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub seed_from: SeedFrom,
    pub run_seed: u64,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    /// AUTOMATIC1111's name, with " Karras" when Karras sigmas were used.
    pub sampler_name: String,
    /// latent's `--scheduler` name.
    pub scheduler: String,
    pub karras: bool,
    pub rng: String,
    pub model: String,
    pub device: String,
    pub dtype: String,
    /// The VAE that decoded the image when it replaced the model's (`--vae`); absent in
    /// records of runs that used the model's own, and in records written before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    /// The LoRAs given for every line (`--lora`: `FILE:WEIGHT`, comma-separated); absent when
    /// none were. A line's own `<lora:...>` tags are in its prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loras: Option<String>,
    /// How the prompts were read; records written before this field read them as plain text.
    #[serde(default = "plain_syntax")]
    pub prompt_syntax: PromptSyntax,
    /// AUTOMATIC1111's clip skip (1 in records written before this field).
    #[serde(default = "one")]
    pub clip_skip: usize,
    /// Images in the UNet batch that made this one; `None` for a recovered image (see
    /// [`Existing::Same`]).
    pub batch_size: Option<usize>,
    /// The `parameters` text stored in the PNG.
    pub parameters: String,
    /// `None` for an image found on disk from an earlier run whose record was lost.
    pub timings: Option<RecordTimings>,
    /// When the record was written, seconds since the Unix epoch.
    pub finished_unix_s: f64,
}

fn plain_syntax() -> PromptSyntax {
    PromptSyntax::Plain
}

fn one() -> usize {
    1
}

/// What every record of a run shares.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub run_seed: u64,
    pub model: String,
    pub device: String,
    pub dtype: String,
    /// The replacement VAE's name, when there is one.
    pub vae: Option<String>,
    /// The LoRAs every line gets, when there are some ([`RunInfo::loras_of`]).
    pub loras: Option<String>,
}

impl RunInfo {
    /// The LoRAs `model` gives every prompt, as records name them: `FILE:WEIGHT`, joined by
    /// `, `; `None` for none.
    pub fn loras_of(model: &crate::pipeline::StableDiffusion) -> Option<String> {
        let base = model.base_loras();
        (!base.is_empty()).then(|| {
            base.iter()
                .map(|l| match l.unet_weight {
                    Some(u) => format!("{}:{}:{u}", l.path.display(), l.weight),
                    None => format!("{}:{}", l.path.display(), l.weight),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
    }
}

impl Record {
    /// The record of `job`, written to `file` (relative to the output folder).
    pub fn new(
        job: &Job,
        file: &Path,
        run: &RunInfo,
        batch_size: Option<usize>,
        parameters: String,
        timings: Option<RecordTimings>,
    ) -> Self {
        let s = &job.sampling;
        let file = file
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        Record {
            file,
            index: job.index,
            source: job.source(),
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            seed: job.seed,
            seed_from: job.seed_from,
            run_seed: run.run_seed,
            width: s.width,
            height: s.height,
            steps: s.steps,
            cfg_scale: s.guidance,
            sampler_name: sampler_name(s.scheduler, s.karras),
            scheduler: s.scheduler.cli_name().to_string(),
            karras: s.karras,
            rng: s.rng.to_string(),
            model: run.model.clone(),
            device: run.device.clone(),
            dtype: run.dtype.clone(),
            vae: run.vae.clone(),
            loras: run.loras.clone(),
            prompt_syntax: s.text.syntax,
            clip_skip: s.text.clip_skip,
            batch_size,
            parameters,
            timings,
            finished_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }

    /// The key of the item this record made (see [`Job::key`]).
    pub fn key(&self) -> ItemKey {
        ItemKey {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            width: self.width,
            height: self.height,
            steps: self.steps,
            cfg_micros: cfg_micros(self.cfg_scale),
            scheduler: self.scheduler.clone(),
            karras: self.karras,
            rng: self.rng.clone(),
            model: self.model.clone(),
            dtype: self.dtype.clone(),
            vae: self.vae.clone(),
            loras: self.loras.clone(),
            prompt_syntax: self.prompt_syntax,
            clip_skip: self.clip_skip,
        }
    }
}

/// Everything that decides an image: prompt, negative prompt, seed, sampling settings, model,
/// its dtype, a replacement VAE and the LoRAs given for every line (an f32 and a bf16 image
/// differ in their pixels). Resume matches items to records by this key, not by index or file name, so editing other
/// lines of a prompt file does not make a finished image count as another item.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItemKey {
    pub(super) prompt: String,
    pub(super) negative_prompt: String,
    pub(super) seed: u64,
    pub(super) width: usize,
    pub(super) height: usize,
    pub(super) steps: usize,
    pub(super) cfg_micros: i64,
    pub(super) scheduler: String,
    pub(super) karras: bool,
    pub(super) rng: String,
    pub(super) model: String,
    pub(super) dtype: String,
    pub(super) vae: Option<String>,
    pub(super) loras: Option<String>,
    pub(super) prompt_syntax: PromptSyntax,
    pub(super) clip_skip: usize,
}

/// The manifest file, open for appending records.
///
/// Records are appended one line at a time with a single write, then synced, and only after
/// their PNG is in place; so every record names a finished file. A run stopped in the middle of
/// a write can leave a last line without its newline: [`Manifest::open`] drops such a torn
/// line (with a warning) before appending.
pub struct Manifest {
    path: PathBuf,
    file: File,
}

/// What [`Manifest::read`] found.
#[derive(Debug, Clone, Default)]
pub struct ManifestContents {
    pub records: Vec<Record>,
    /// Byte length of the complete lines; a longer file ends in a torn line.
    pub complete_len: u64,
    /// The torn last line, when there is one.
    pub torn: Option<String>,
}

impl Manifest {
    /// Reads the manifest at `path` without changing it; a missing file has no records.
    ///
    /// A complete line that is not a record is an error naming the line (the manifest is the
    /// run's memory, so it is not guessed around); only a last line without a newline that
    /// does not parse is reported as torn.
    pub fn read(path: &Path) -> Result<ManifestContents> {
        // A link could point anywhere: the manifest is the folder's own file or an error.
        let Some(bytes) = crate::files::read_no_follow(path)? else {
            return Ok(ManifestContents::default());
        };
        let mut contents = ManifestContents::default();
        let mut offset = 0usize;
        for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
            let complete = line.ends_with(b"\n");
            let parsed = std::str::from_utf8(line)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    if text.trim().is_empty() {
                        Ok(None)
                    } else {
                        serde_json::from_str::<Record>(text)
                            .map(Some)
                            .map_err(|e| e.to_string())
                    }
                });
            match parsed {
                Ok(record) => {
                    contents.records.extend(record);
                    offset += line.len();
                    if complete {
                        contents.complete_len = offset as u64;
                    }
                }
                Err(_) if !complete => {
                    contents.torn = Some(String::from_utf8_lossy(line).into_owned());
                }
                Err(e) => {
                    return Err(Error::InvalidInput(format!(
                        "{}:{}: not a manifest record ({e}); fix or delete this line",
                        path.display(),
                        i + 1
                    )))
                }
            }
        }
        Ok(contents)
    }

    /// Opens (creating) the manifest at `path` for appending and returns what it held.
    ///
    /// A torn last line is cut off and returned in [`ManifestContents::torn`] so the caller can
    /// warn; a complete last record without its newline gets one.
    pub fn open(path: &Path) -> Result<(Manifest, ManifestContents)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let contents = Manifest::read(path)?;
        let mut file = crate::files::open_append_no_follow(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if contents.torn.is_some() {
            file.set_len(contents.complete_len)
                .map_err(|e| Error::io(path, e))?;
        } else if len > contents.complete_len {
            // A last record without its newline (written by hand): end the line.
            file.write_all(b"\n").map_err(|e| Error::io(path, e))?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(|e| Error::io(path, e))?;
        Ok((
            Manifest {
                path: path.to_path_buf(),
                file,
            },
            contents,
        ))
    }

    /// Appends one record as one line and syncs it to disk.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record)
            .map_err(|e| Error::InvalidInput(format!("cannot write a manifest record: {e}")))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// The manifest's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The items a run already finished: records whose file is still in the output folder.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    files: HashMap<ItemKey, String>,
}

impl Finished {
    /// Keeps the records of `records` whose file exists under `dir`. When several records name
    /// one file (an item remade over it with `--overwrite`, e.g. in another dtype), the last
    /// one says what the file holds now.
    pub fn new(dir: &Path, records: &[Record]) -> Self {
        let mut latest: HashMap<&str, &Record> = HashMap::new();
        for r in records {
            latest.insert(r.file.as_str(), r);
        }
        let files = latest
            .into_values()
            .filter(|r| dir.join(&r.file).is_file())
            .map(|r| (r.key(), r.file.clone()))
            .collect();
        Finished { files }
    }

    /// The file (relative to the output folder) of a finished item with this key.
    pub fn file(&self, key: &ItemKey) -> Option<&str> {
        self.files.get(key).map(String::as_str)
    }

    /// Number of finished items.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when nothing is finished.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// What is at an item's planned file when the manifest does not list the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    /// Nothing: make the image.
    Missing,
    /// A PNG with exactly the parameters this item would write: an image from an earlier run
    /// stopped between writing the PNG and its record. It can be recorded as is.
    Same,
    /// Something else; the reason says what.
    Different(String),
}

/// Looks at `path` for an item whose PNG would carry `parameters`.
pub fn existing_file(path: &Path, parameters: &str) -> Existing {
    if fs::symlink_metadata(path).is_err() {
        return Existing::Missing;
    }
    match crate::output::read_png_parameters(path) {
        Ok(Some(found)) if found == parameters => Existing::Same,
        Ok(Some(_)) => Existing::Different("it holds an image with other settings".into()),
        Ok(None) => Existing::Different("it is a PNG without generation parameters".into()),
        Err(e) => Existing::Different(format!("it is not a readable PNG ({e})")),
    }
}
