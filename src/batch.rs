//! Prompt files for `latent batch`: parsing (plain text, AUTOMATIC1111 option lines, JSONL),
//! the job list (run defaults, per-line overrides, seeds), grouping into UNet batches, output
//! file names, the manifest of finished images, and resume.
//!
//! The pieces are pure data and functions; the one stage that touches the model,
//! [`render_jobs`], reuses the pipeline's `encode_prompt` and `render_batch`. The binary owns
//! the loop, the files on disk and the progress bars.
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pipeline::{
    Event, GeneratedImage, PromptEmbeddings, Sampling, StableDiffusion, Timings,
};
use crate::schedulers::SchedulerKind;
use crate::{Error, Result, Setting};

mod check;
mod run;
mod shard;

pub use check::{CheckGroup, CheckItem, CheckReport};
pub use run::{Access, Batch, BatchConfig, BatchEvent, Stop, Summary};
pub use shard::{
    manifest_files, merge, read_all, MergeReport, Shard, K8S_INDEX_ENV, SHARD_COUNT_ENV,
    SLURM_COUNT_ENV, SLURM_ID_ENV, SLURM_MIN_ENV,
};

// ---------------------------------------------------------------------------------------------
// Formats and reading files
// ---------------------------------------------------------------------------------------------

/// How a prompt file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One prompt per line, or one line of AUTOMATIC1111 options (`--prompt "..." --steps 20`);
    /// `#` comments and blank lines are skipped. Extensions `.txt`, `.text`, `.prompts`.
    Text,
    /// One JSON object per line with the option names as keys; `#` comments and blank lines are
    /// skipped. Extensions `.jsonl`, `.ndjson`.
    Jsonl,
}

impl Format {
    /// The format a file's extension names (ASCII case ignored), if any.
    pub fn from_extension(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "text" | "prompts" => Some(Format::Text),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            _ => None,
        }
    }

    /// The name used by `--format`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Jsonl => "jsonl",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = Error;

    /// `text` (also `txt`, `a1111`) or `jsonl` (also `ndjson`), ASCII case ignored.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "txt" | "a1111" => Ok(Format::Text),
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            _ => Err(Error::InvalidInput(format!(
                "unknown prompt file format `{s}`; expected text or jsonl"
            ))),
        }
    }
}

/// What one prompt line asks for. `None` fields take the run's defaults (the command-line flags).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LineSpec {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// The line's own seed; `--seed -1` (A1111's "random") is the same as none.
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: Option<SchedulerKind>,
    pub karras: Option<bool>,
    /// A1111's images per batch; here only a count: images per line = batch_size x n_iter.
    pub batch_size: Option<usize>,
    /// A1111's number of batches; images per line = batch_size x n_iter.
    pub n_iter: Option<usize>,
}

/// One usable line of a prompt file.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// 1-based line number.
    pub line: usize,
    pub spec: LineSpec,
}

/// A line that cannot be used, with where it is and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}

impl std::error::Error for LineError {}

/// A prompt file: its usable lines and its malformed ones, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptFile {
    pub path: PathBuf,
    pub format: Format,
    pub lines: Vec<Line>,
    pub errors: Vec<LineError>,
}

/// Reads and parses a prompt file; `format` overrides the one its extension names.
///
/// Errors (for the whole file): missing or unreadable, an extension that names no format
/// without `format`, not UTF-8 (with the line of the first bad byte), empty, or only comments
/// and blank lines. Malformed lines are not errors here: they are collected in
/// [`PromptFile::errors`] so the other lines can still run.
pub fn read_prompt_file(path: &Path, format: Option<Format>) -> Result<PromptFile> {
    let format = match format.or_else(|| Format::from_extension(path)) {
        Some(f) => f,
        None => {
            return Err(Error::InvalidInput(format!(
                "{}: cannot tell the format from the extension (.txt for plain or AUTOMATIC1111 \
                 lines, .jsonl for JSON lines); pass --format text or --format jsonl",
                path.display()
            )))
        }
    };
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = decode_utf8(path, &bytes)?;
    parse_prompt_text(path, text, format)
}

/// The file's text, or an error that says where the first non-UTF-8 byte is.
fn decode_utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err(Error::InvalidInput(format!(
            "{}: the file is UTF-16; save it as UTF-8",
            path.display()
        )));
    }
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::InvalidInput(format!(
            "{}:{line}: the file is not valid UTF-8 (byte {at} is 0x{:02X}); save it as UTF-8",
            path.display(),
            bytes[at]
        ))
    })
}

/// Parses the text of a prompt file (see [`read_prompt_file`]); `path` only labels errors.
pub fn parse_prompt_text(path: &Path, text: &str, format: Format) -> Result<PromptFile> {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: the file is empty",
            path.display()
        )));
    }
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let parsed = match format {
            Format::Text => parse_text_line(raw),
            Format::Jsonl => parse_json_line(raw),
        };
        match parsed {
            Ok(Some(spec)) => lines.push(Line { line: i + 1, spec }),
            Ok(None) => {}
            Err(message) => errors.push(LineError {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            }),
        }
    }
    if lines.is_empty() && errors.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: no prompts in the file (only comments and blank lines)",
            path.display()
        )));
    }
    Ok(PromptFile {
        path: path.to_path_buf(),
        format,
        lines,
        errors,
    })
}

/// True for lines a prompt file skips: blank, or `#` as the first non-blank character.
fn is_skipped(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// One line of a text file: `Ok(None)` for a comment or blank line; a line whose first word
/// starts with `--` is a line of options, any other line is a prompt.
///
/// AUTOMATIC1111 treats any line that contains `--` as options and silently falls back to a
/// prompt when they do not parse; here a prompt line that holds a known option (`a cat --steps
/// 5`) is an error instead, since it is almost surely an option line written in the wrong order.
pub fn parse_text_line(line: &str) -> std::result::Result<Option<LineSpec>, String> {
    if is_skipped(line) {
        return Ok(None);
    }
    let t = line.trim();
    if t.starts_with("--") {
        return parse_options(t).map(Some);
    }
    for word in t.split_whitespace() {
        if let Some(name) = word.strip_prefix("--") {
            let name = name.split('=').next().unwrap_or(name);
            if KNOWN_KEYS.contains(&normalize_key(name).as_str()) {
                return Err(format!(
                    "`{word}` in the middle of a prompt: options must come first, and the \
                     prompt goes in --prompt \"...\""
                ));
            }
        }
    }
    Ok(Some(LineSpec {
        prompt: t.to_string(),
        ..LineSpec::default()
    }))
}

/// Splits a line into words as a POSIX shell does (and Python's `shlex.split`, which
/// AUTOMATIC1111 uses): whitespace separates words; `'...'` keeps everything literally; `"..."`
/// keeps everything but `\"` and `\\`, which become `"` and `\`; outside quotes a backslash
/// keeps the next character literally; quoted and unquoted parts next to each other form one
/// word (`a"b c"` is `ab c`).
pub fn split_words(line: &str) -> std::result::Result<Vec<String>, String> {
    #[derive(PartialEq)]
    enum State {
        Between,
        Word,
        Single(usize),
        Double(usize),
    }
    let mut words = Vec::new();
    let mut word = String::new();
    let mut state = State::Between;
    let mut chars = line.chars().enumerate().peekable();
    while let Some((col, c)) = chars.next() {
        match state {
            State::Between | State::Word => match c {
                c if c.is_whitespace() => {
                    if state == State::Word {
                        words.push(std::mem::take(&mut word));
                        state = State::Between;
                    }
                }
                '\'' => state = State::Single(col + 1),
                '"' => state = State::Double(col + 1),
                '\\' => match chars.next() {
                    Some((_, next)) => {
                        word.push(next);
                        state = State::Word;
                    }
                    None => {
                        return Err(format!(
                            "a backslash at the end of the line (column {}) escapes nothing",
                            col + 1
                        ))
                    }
                },
                c => {
                    word.push(c);
                    state = State::Word;
                }
            },
            State::Single(_) => match c {
                '\'' => state = State::Word,
                c => word.push(c),
            },
            State::Double(_) => match c {
                '"' => state = State::Word,
                '\\' => match chars.peek() {
                    Some(&(_, next @ ('"' | '\\'))) => {
                        word.push(next);
                        chars.next();
                    }
                    _ => word.push('\\'),
                },
                c => word.push(c),
            },
        }
    }
    match state {
        State::Single(col) => Err(format!("unclosed single quote (opened at column {col})")),
        State::Double(col) => Err(format!("unclosed double quote (opened at column {col})")),
        State::Word => {
            words.push(word);
            Ok(words)
        }
        State::Between => Ok(words),
    }
}

/// Option names a line may use (AUTOMATIC1111's, plus `scheduler` and `karras` as on latent's
/// command line).
const KNOWN_KEYS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "sampler_name",
    "scheduler",
    "karras",
    "batch_size",
    "n_iter",
];

/// Options of AUTOMATIC1111's "Prompts from file" script that latent does not implement.
const A1111_UNSUPPORTED: &[&str] = &[
    "sd_model",
    "outpath_samples",
    "outpath_grids",
    "prompt_for_display",
    "styles",
    "subseed_strength",
    "subseed",
    "seed_resize_from_h",
    "seed_resize_from_w",
    "sampler_index",
    "restore_faces",
    "tiling",
    "do_not_save_samples",
    "do_not_save_grid",
];

/// `negative-prompt` and `negative_prompt` name the same option.
fn normalize_key(key: &str) -> String {
    key.replace('-', "_")
}

/// A line of AUTOMATIC1111 options: `--name value` pairs (or `--name=value`).
///
/// As in A1111, the value of `--prompt` and `--negative_prompt` runs on over the following words
/// up to the next word starting with `--`, joined by single spaces, so quotes are optional there.
pub fn parse_options(line: &str) -> std::result::Result<LineSpec, String> {
    let words = split_words(line)?;
    let mut builder = SpecBuilder::default();
    let mut i = 0;
    while i < words.len() {
        let word = &words[i];
        let Some(name) = word.strip_prefix("--") else {
            return Err(format!(
                "expected an option starting with `--`, found `{word}` (quote values that hold \
                 spaces)"
            ));
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (name, None),
        };
        let key = normalize_key(name);
        i += 1;
        let value = match inline {
            Some(v) => v,
            None => match words.get(i) {
                Some(v) if !v.starts_with("--") => {
                    i += 1;
                    v.clone()
                }
                _ => return Err(format!("--{name} needs a value")),
            },
        };
        let value = if key == "prompt" || key == "negative_prompt" {
            let mut value = value;
            while let Some(more) = words.get(i).filter(|w| !w.starts_with("--")) {
                value.push(' ');
                value.push_str(more);
                i += 1;
            }
            value
        } else {
            value
        };
        builder.set(&key, &format!("--{name}"), RawValue::Word(value))?;
    }
    builder.finish("--prompt")
}

/// One line of a JSONL file: an object whose keys are the option names (`prompt`, `seed`, ...);
/// `Ok(None)` for a comment or blank line.
pub fn parse_json_line(line: &str) -> std::result::Result<Option<LineSpec>, String> {
    if is_skipped(line) {
        return Ok(None);
    }
    let value: Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err(format!(
            "expected a JSON object like {{\"prompt\": \"...\"}}, found {}",
            json_kind(&value)
        ));
    };
    let mut builder = SpecBuilder::default();
    for (key, value) in map {
        builder.set(&key, &format!("`{key}`"), RawValue::Json(value))?;
    }
    builder.finish("`prompt`").map(Some)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An option's value as written: a word of a text line, or a JSON value.
enum RawValue {
    Word(String),
    Json(Value),
}

impl RawValue {
    fn string(self, label: &str) -> std::result::Result<String, String> {
        match self {
            RawValue::Word(w) => Ok(w),
            RawValue::Json(Value::String(s)) => Ok(s),
            RawValue::Json(v) => Err(format!(
                "{label}: expected a string, found {}",
                json_kind(&v)
            )),
        }
    }

    /// A whole number of at least `min`.
    fn count(self, label: &str, min: usize) -> std::result::Result<usize, String> {
        let n = match self {
            RawValue::Word(w) => w
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("{label} {w}: expected a whole number of at least {min}"))?,
            RawValue::Json(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("{label} {n}: expected a whole number of at least {min}"))?,
            RawValue::Json(v) => {
                return Err(format!(
                    "{label}: expected a whole number, found {}",
                    json_kind(&v)
                ))
            }
        };
        if n < min {
            return Err(format!("{label} {n}: must be at least {min}"));
        }
        Ok(n)
    }

    fn float(self, label: &str) -> std::result::Result<f64, String> {
        let x = match self {
            RawValue::Word(w) => w
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{label} {w}: expected a number"))?,
            RawValue::Json(Value::Number(n)) => n
                .as_f64()
                .ok_or_else(|| format!("{label} {n}: expected a number"))?,
            RawValue::Json(v) => {
                return Err(format!(
                    "{label}: expected a number, found {}",
                    json_kind(&v)
                ))
            }
        };
        if !x.is_finite() {
            return Err(format!("{label} {x}: must be a finite number"));
        }
        Ok(x)
    }

    /// A seed: a whole number, or -1 (A1111's "random": the run's seed is used).
    fn seed(self, label: &str) -> std::result::Result<Option<u64>, String> {
        let bad =
            |v: &dyn fmt::Display| format!("{label} {v}: expected a whole number >= 0, or -1");
        match self {
            RawValue::Word(w) => match w.trim() {
                "-1" => Ok(None),
                t => t.parse::<u64>().map(Some).map_err(|_| bad(&w)),
            },
            RawValue::Json(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(s), _) => Ok(Some(s)),
                (None, Some(-1)) => Ok(None),
                _ => Err(bad(&n)),
            },
            RawValue::Json(Value::Null) => Ok(None),
            RawValue::Json(v) => Err(format!(
                "{label}: expected a whole number, found {}",
                json_kind(&v)
            )),
        }
    }

    fn boolean(self, label: &str) -> std::result::Result<bool, String> {
        match self {
            RawValue::Word(w) => match w.trim().to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!("{label} {w}: expected true or false")),
            },
            RawValue::Json(Value::Bool(b)) => Ok(b),
            RawValue::Json(v) => Err(format!(
                "{label}: expected true or false, found {}",
                json_kind(&v)
            )),
        }
    }
}

/// Collects a line's options, refusing repeats, unknown names and conflicting samplers.
#[derive(Default)]
struct SpecBuilder {
    spec: LineSpec,
    prompt: Option<String>,
    seen: HashSet<String>,
    /// Karras implied by `sampler_name` ("DPM++ 2M Karras"), kept apart to spot conflicts.
    sampler_karras: Option<bool>,
    sampler_from: Option<&'static str>,
}

impl SpecBuilder {
    fn set(&mut self, key: &str, label: &str, value: RawValue) -> std::result::Result<(), String> {
        if !self.seen.insert(key.to_string()) {
            return Err(format!("{label} is given twice"));
        }
        let s = &mut self.spec;
        match key {
            "prompt" => self.prompt = Some(value.string(label)?),
            "negative_prompt" => s.negative_prompt = Some(value.string(label)?),
            "seed" => s.seed = value.seed(label)?,
            "steps" => s.steps = Some(value.count(label, 1)?),
            "cfg_scale" => s.cfg_scale = Some(value.float(label)?),
            "width" => s.width = Some(value.count(label, 1)?),
            "height" => s.height = Some(value.count(label, 1)?),
            "batch_size" => s.batch_size = Some(value.count(label, 1)?),
            "n_iter" => s.n_iter = Some(value.count(label, 1)?),
            "karras" => s.karras = Some(value.boolean(label)?),
            "sampler_name" | "scheduler" => {
                if let Some(other) = self.sampler_from {
                    return Err(format!(
                        "give either sampler_name or scheduler, not both ({other} is given too)"
                    ));
                }
                let name = value.string(label)?;
                let (kind, karras) = if key == "sampler_name" {
                    parse_sampler_name(&name).map_err(|e| format!("{label}: {e}"))?
                } else {
                    let kind = name.parse().map_err(|e: Error| format!("{label}: {e}"))?;
                    (kind, false)
                };
                s.scheduler = Some(kind);
                if key == "sampler_name" {
                    self.sampler_karras = Some(karras);
                    self.sampler_from = Some("sampler_name");
                } else {
                    self.sampler_from = Some("scheduler");
                }
            }
            k if A1111_UNSUPPORTED.contains(&k) => {
                return Err(format!(
                    "{label}: this AUTOMATIC1111 option is not supported by latent"
                ))
            }
            _ => {
                return Err(format!(
                    "unknown option {label}; known: {}",
                    KNOWN_KEYS.join(", ")
                ))
            }
        }
        Ok(())
    }

    fn finish(mut self, prompt_label: &str) -> std::result::Result<LineSpec, String> {
        let Some(prompt) = self.prompt else {
            return Err(format!("no {prompt_label} on this line"));
        };
        if prompt.trim().is_empty() {
            return Err(format!("{prompt_label} is empty"));
        }
        self.spec.prompt = prompt;
        match (self.spec.karras, self.sampler_karras) {
            (Some(false), Some(true)) => {
                return Err("karras is false but sampler_name asks for Karras".into())
            }
            (None, implied) => self.spec.karras = implied,
            _ => {}
        }
        Ok(self.spec)
    }
}

/// Reads a sampler name as AUTOMATIC1111 writes it ("Euler a", "DPM++ 2M Karras", "DDIM",
/// "PLMS", "Euler", and the old `k_` aliases), ASCII case ignored, or as latent's `--scheduler`
/// does ("euler-a", "dpm++2m", ...). Returns the scheduler and whether a " Karras" suffix asked
/// for Karras sigmas.
pub fn parse_sampler_name(name: &str) -> std::result::Result<(SchedulerKind, bool), String> {
    let lower = name.trim().to_ascii_lowercase();
    let (base, karras) = match lower.strip_suffix(" karras") {
        Some(base) => (base.trim_end(), true),
        None => match lower.as_str() {
            "k_dpmpp_2m_ka" => ("dpm++ 2m", true),
            other => (other, false),
        },
    };
    let kind = match base {
        "euler a" | "k_euler_a" => SchedulerKind::EulerAncestral,
        "euler" | "k_euler" => SchedulerKind::Euler,
        "dpm++ 2m" | "k_dpmpp_2m" => SchedulerKind::DpmPp2m,
        "ddim" => SchedulerKind::Ddim,
        "plms" => SchedulerKind::Pndm,
        other => other.parse().map_err(|_| {
            let known: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.a1111_name()).collect();
            format!(
                "unknown sampler `{name}`; latent has {} (add \" Karras\" to Euler or DPM++ 2M for \
                 Karras sigmas)",
                known.join(", ")
            )
        })?,
    };
    Ok((kind, karras))
}

/// The sampler's name as AUTOMATIC1111's `--sampler_name` takes it ("DPM++ 2M Karras").
pub fn sampler_name(kind: SchedulerKind, karras: bool) -> String {
    if karras {
        format!("{} Karras", kind.a1111_name())
    } else {
        kind.a1111_name().to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// The job list
// ---------------------------------------------------------------------------------------------

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
    pub fn key(&self, model: &str) -> ItemKey {
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
            model: model.to_string(),
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
    crate::pipeline::check_prompt(&job.prompt)?;
    check_text(Setting::Prompt, &job.prompt)?;
    check_text(Setting::NegativePrompt, &job.negative_prompt)?;
    model.check_sampling(&job.sampling, 1)
}

/// A prompt goes into the PNG's text chunk, which forbids NUL; other control characters
/// (tab and newline aside) are invisible in every place the prompt is shown, so both are
/// refused rather than written.
fn check_text(setting: Setting, text: &str) -> Result<()> {
    match text
        .chars()
        .find(|&c| c.is_control() && c != '\t' && c != '\n')
    {
        Some(c) => Err(Error::setting(
            setting,
            format!("{:?}", one_line_preview(text)),
            format!(
                "holds the control character U+{:04X}; remove it",
                u32::from(c)
            ),
        )),
        None => Ok(()),
    }
}

/// The first characters of `text`, control characters escaped, for an error message.
fn one_line_preview(text: &str) -> String {
    text.chars().take(40).collect()
}

// ---------------------------------------------------------------------------------------------
// Grouping
// ---------------------------------------------------------------------------------------------

/// Whether images with these settings can share one UNet batch: same size, steps, scheduler,
/// Karras, guidance (the same guidance also means the same CFG doubling) and generator.
/// Prompts, negative prompts and seeds may differ.
pub fn same_batch(a: &Sampling, b: &Sampling) -> bool {
    a.width == b.width
        && a.height == b.height
        && a.steps == b.steps
        && a.scheduler == b.scheduler
        && a.karras == b.karras
        && a.guidance.to_bits() == b.guidance.to_bits()
        && a.rng == b.rng
}

/// Jobs that can run together, in item order.
#[derive(Debug, Clone)]
pub struct Group<'a> {
    pub jobs: Vec<&'a Job>,
}

impl<'a> Group<'a> {
    /// The group's shared settings.
    pub fn sampling(&self) -> &'a Sampling {
        &self.jobs[0].sampling
    }

    /// The UNet batches: consecutive runs of at most `batch_size` jobs (`batch_size` >= 1).
    pub fn batches(&self, batch_size: usize) -> std::slice::Chunks<'_, &'a Job> {
        self.jobs.chunks(batch_size.max(1))
    }
}

/// Groups jobs by [`same_batch`]: groups in the order their first job comes, jobs in order.
pub fn group_jobs<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Vec<Group<'a>> {
    let mut groups: Vec<Group<'a>> = Vec::new();
    for job in jobs {
        match groups
            .iter_mut()
            .find(|g| same_batch(g.sampling(), &job.sampling))
        {
            Some(g) => g.jobs.push(job),
            None => groups.push(Group { jobs: vec![job] }),
        }
    }
    groups
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// Stages 1 to 6 for one batch of jobs that share their sampling settings ([`same_batch`]):
/// encodes each distinct (prompt, negative prompt) once, stacks one embedding row per image,
/// and runs the pipeline's `render_batch` with one seed per image.
///
/// Each image is what the same job makes alone, up to float summation order (see
/// `tests/batch.rs`). `first_image` only labels progress events; stage times are added to
/// `timings`.
pub fn render_jobs(
    model: &StableDiffusion,
    jobs: &[&Job],
    first_image: usize,
    timings: &mut Timings,
    on_event: &mut dyn FnMut(Event),
) -> Result<Vec<GeneratedImage>> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    let s = &first.sampling;
    if let Some(odd) = jobs.iter().find(|j| !same_batch(&j.sampling, s)) {
        return Err(Error::InvalidInput(format!(
            "items {} and {} have different settings and cannot share a batch",
            first.index, odd.index
        )));
    }
    let start = Instant::now();
    let mut encoded: Vec<(&str, &str, PromptEmbeddings)> = Vec::new();
    let mut rows = Vec::with_capacity(jobs.len());
    for job in jobs {
        let found = encoded
            .iter()
            .position(|(p, n, _)| *p == job.prompt && *n == job.negative_prompt);
        let at = match found {
            Some(at) => at,
            None => {
                let e =
                    model.encode_prompt(&job.prompt, &job.negative_prompt, s.guidance, on_event)?;
                encoded.push((&job.prompt, &job.negative_prompt, e));
                encoded.len() - 1
            }
        };
        rows.push(at);
    }
    // One prompt for the whole batch: a single row, repeated by the pipeline like `generate`.
    let embeddings = if encoded.len() == 1 {
        encoded[0].2.clone()
    } else {
        let per_image: Vec<PromptEmbeddings> = rows.iter().map(|&r| encoded[r].2.clone()).collect();
        PromptEmbeddings::stack(&per_image)?
    };
    timings.text_encode += start.elapsed();
    let seeds: Vec<u64> = jobs.iter().map(|j| j.seed).collect();
    model.render_batch(&embeddings, &seeds, None, s, first_image, timings, on_event)
}

/// Measured cost of one batch shape, for `--check`'s estimate.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Seconds per denoising step (one UNet call, CFG doubling included).
    pub step_s: f64,
    /// Seconds to decode the batch.
    pub decode_s: f64,
    /// Seconds to encode one prompt (and negative prompt).
    pub text_encode_s: f64,
}

/// Times one denoising step and one decode of a batch of `batch` images with `s`'s size and
/// guidance (a throwaway image from an empty prompt; nothing is written). The first call on a
/// device includes its warm-up, so the estimate errs on the long side.
pub fn probe(model: &StableDiffusion, s: &Sampling, batch: usize) -> Result<Probe> {
    let mut quiet = |_: Event| {};
    let start = Instant::now();
    let embeddings = model.encode_prompt("", "", s.guidance, &mut quiet)?;
    let text_encode_s = start.elapsed().as_secs_f64();
    let one_step = Sampling {
        steps: 1,
        scheduler: SchedulerKind::Ddim,
        karras: false,
        ..s.clone()
    };
    let mut timings = Timings::default();
    let seeds: Vec<u64> = (0..batch.max(1) as u64).collect();
    model.render_batch(
        &embeddings,
        &seeds,
        None,
        &one_step,
        0,
        &mut timings,
        &mut quiet,
    )?;
    Ok(Probe {
        step_s: timings.seconds_per_step(),
        decode_s: timings.decode.as_secs_f64(),
        text_encode_s,
    })
}

/// Estimated wall time of a group's batches from a [`Probe`] of its batch shape: steps x step
/// time + decode per batch, plus one prompt encoding per item. `scheduler_steps` is the
/// scheduler's loop length (PNDM runs one more than asked).
pub fn estimate(probe: &Probe, scheduler_steps: usize, batches: usize, items: usize) -> Duration {
    let secs = batches as f64 * (scheduler_steps as f64 * probe.step_s + probe.decode_s)
        + items as f64 * probe.text_encode_s;
    Duration::from_secs_f64(secs.max(0.0))
}

// ---------------------------------------------------------------------------------------------
// File names
// ---------------------------------------------------------------------------------------------

/// The default output file name template.
pub const DEFAULT_TEMPLATE: &str = "{index:05}-{seed}-{prompt_slug}.png";

/// Longest prompt slug, in bytes (file names stay well under the usual 255-byte limit).
pub const SLUG_MAX_BYTES: usize = 48;

/// A fields a file name template can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Index,
    Seed,
    PromptSlug,
    File,
    Line,
    Width,
    Height,
    Steps,
}

impl Field {
    const ALL: [(&'static str, Field); 8] = [
        ("index", Field::Index),
        ("seed", Field::Seed),
        ("prompt_slug", Field::PromptSlug),
        ("file", Field::File),
        ("line", Field::Line),
        ("width", Field::Width),
        ("height", Field::Height),
        ("steps", Field::Steps),
    ];

    fn is_number(self) -> bool {
        !matches!(self, Field::PromptSlug | Field::File)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field { field: Field, zero_pad: usize },
}

/// An output file name template: text with `{field}` or `{field:0N}` (zero-padded to N digits)
/// placeholders, relative to the output folder and ending in `.png`. Fields: `index`, `seed`,
/// `prompt_slug`, `file` (the prompt file's stem, slugged), `line`, `width`, `height`, `steps`.
/// `{{` and `}}` are literal braces; `/` makes subfolders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    parts: Vec<Part>,
}

impl FromStr for NameTemplate {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::InvalidInput(format!("--filename `{s}`: {why}"));
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => {
                    return Err(bad(
                        "a `}` without `{` (write `}}` for a literal one)".into()
                    ))
                }
                '{' => {
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => inner.push(c),
                            None => return Err(bad("a `{` is never closed".into())),
                        }
                    }
                    let (name, spec) = match inner.split_once(':') {
                        Some((n, sp)) => (n, Some(sp)),
                        None => (inner.as_str(), None),
                    };
                    let Some(&(_, field)) = Field::ALL.iter().find(|(n, _)| *n == name) else {
                        let known: Vec<&str> = Field::ALL.iter().map(|(n, _)| *n).collect();
                        return Err(bad(format!(
                            "unknown field {{{name}}}; known: {}",
                            known.join(", ")
                        )));
                    };
                    let zero_pad = match spec {
                        None => 0,
                        Some(sp) => {
                            let digits = sp.strip_prefix('0').filter(|_| field.is_number());
                            match digits.and_then(|d| d.parse::<usize>().ok()) {
                                Some(n) if (1..=20).contains(&n) => n,
                                _ => {
                                    return Err(bad(format!(
                                        "{{{inner}}}: the only format is zero padding of a \
                                         number field, like {{index:05}}"
                                    )))
                                }
                            }
                        }
                    };
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field { field, zero_pad });
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        let template = NameTemplate { parts };
        // Fields never hold separators, so the shape of the path shows with placeholders.
        let skeleton = template.render_with(&|_| "x".to_string());
        if !skeleton.to_ascii_lowercase().ends_with(".png") {
            return Err(bad("must end in .png".into()));
        }
        if skeleton.contains('\\') {
            return Err(bad("use / for subfolders".into()));
        }
        let path = Path::new(&skeleton);
        if !path.components().all(|c| matches!(c, Component::Normal(_)))
            || skeleton.split('/').any(|part| part.is_empty())
        {
            return Err(bad(
                "must be a relative path inside the output folder (no leading /, no . or .., \
                 no empty parts)"
                    .into(),
            ));
        }
        Ok(template)
    }
}

impl NameTemplate {
    /// The file for `job`, relative to the output folder.
    pub fn render(&self, job: &Job) -> PathBuf {
        PathBuf::from(self.render_with(&|field| {
            match field {
                Field::Index => job.index.to_string(),
                Field::Seed => job.seed.to_string(),
                Field::PromptSlug => prompt_slug(&job.prompt),
                Field::File => prompt_slug(
                    &job.path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                Field::Line => job.line.to_string(),
                Field::Width => job.sampling.width.to_string(),
                Field::Height => job.sampling.height.to_string(),
                Field::Steps => job.sampling.steps.to_string(),
            }
        }))
    }

    fn render_with(&self, value: &dyn Fn(Field) -> String) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field { field, zero_pad } => {
                    let v = value(*field);
                    out.push_str(&format!("{v:0>zero_pad$}"));
                }
            }
        }
        out
    }

    /// The file of every job, relative to the output folder; an error names two items that
    /// would share a name (the template needs `{index}` or `{seed}`).
    pub fn assign(&self, jobs: &[Job]) -> Result<Vec<PathBuf>> {
        let mut seen: HashMap<PathBuf, &Job> = HashMap::new();
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let name = self.render(job);
            if let Some(other) = seen.insert(name.clone(), job) {
                return Err(Error::InvalidInput(format!(
                    "--filename gives items {} ({}) and {} ({}) the same file {}; add {{index}} \
                     to the template",
                    other.index,
                    other.source(),
                    job.index,
                    job.source(),
                    name.display()
                )));
            }
            out.push(name);
        }
        Ok(out)
    }
}

/// A short, filesystem-safe form of a prompt for file names: lowercase letters and digits (any
/// script), other characters turned into single `_`, at most [`SLUG_MAX_BYTES`] bytes cut at a
/// word boundary when there is one; `prompt` when nothing is left. Names Windows reserves
/// (`con`, `nul`, `com1`, ...) get a trailing `_`.
pub fn prompt_slug(prompt: &str) -> String {
    let mut slug = String::new();
    let mut gap = false;
    for c in prompt.chars().flat_map(char::to_lowercase) {
        if !c.is_alphanumeric() {
            gap = true;
            continue;
        }
        let sep = gap && !slug.is_empty();
        if slug.len() + usize::from(sep) + c.len_utf8() > SLUG_MAX_BYTES {
            // Prefer ending at a word boundary over a cut word.
            if !sep {
                if let Some(cut) = slug.rfind('_') {
                    slug.truncate(cut);
                }
            }
            break;
        }
        if sep {
            slug.push('_');
        }
        slug.push(c);
        gap = false;
    }
    if slug.is_empty() {
        slug.push_str("prompt");
    }
    const RESERVED: &[&str] = &["con", "prn", "aux", "nul"];
    let reserved_numbered = (slug.starts_with("com") || slug.starts_with("lpt"))
        && slug.len() == 4
        && slug.as_bytes()[3].is_ascii_digit();
    if RESERVED.contains(&slug.as_str()) || reserved_numbered {
        slug.push('_');
    }
    slug
}

// ---------------------------------------------------------------------------------------------
// Manifest and resume
// ---------------------------------------------------------------------------------------------

/// File name of the manifest inside the output folder.
pub const MANIFEST_NAME: &str = "manifest.jsonl";

/// Guidance in millionths, so a value read back from JSON compares equal to the one written.
fn cfg_micros(cfg: f64) -> i64 {
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

/// What every record of a run shares.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub run_seed: u64,
    pub model: String,
    pub device: String,
    pub dtype: String,
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
        }
    }
}

/// Everything that decides an image: prompt, negative prompt, seed, sampling settings, model.
/// Resume matches items to records by this key, not by index or file name, so editing other
/// lines of a prompt file does not make a finished image count as another item.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItemKey {
    prompt: String,
    negative_prompt: String,
    seed: u64,
    width: usize,
    height: usize,
    steps: usize,
    cfg_micros: i64,
    scheduler: String,
    karras: bool,
    rng: String,
    model: String,
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
    /// Keeps the records of `records` whose file exists under `dir`.
    pub fn new(dir: &Path, records: &[Record]) -> Self {
        let files = records
            .iter()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::RngKind;

    fn spec(prompt: &str) -> LineSpec {
        LineSpec {
            prompt: prompt.into(),
            ..LineSpec::default()
        }
    }

    fn text(s: &str) -> PromptFile {
        parse_prompt_text(Path::new("p.txt"), s, Format::Text).unwrap()
    }

    fn opt_err(line: &str) -> String {
        parse_text_line(line).unwrap_err()
    }

    // -- words ----------------------------------------------------------------------------

    #[test]
    fn words_split_like_a_shell() {
        let w = |s: &str| split_words(s).unwrap();
        assert_eq!(w("a b  c"), ["a", "b", "c"]);
        assert_eq!(w(r#""a b" 'c d'"#), ["a b", "c d"]);
        assert_eq!(w(r#"a"b c"d"#), ["ab cd"]);
        assert_eq!(w(r#""say \"hi\" \\ \n""#), [r#"say "hi" \ \n"#]);
        assert_eq!(w(r#"'it''s' 'a \ b'"#), ["its", r"a \ b"]);
        assert_eq!(w(r"a\ b \'c"), ["a b", "'c"]);
        assert_eq!(w(r#""" ''"#), ["", ""]);
        assert_eq!(w("  \t "), Vec::<String>::new());
        assert_eq!(w("\"it's\""), ["it's"]);
        assert_eq!(w("caf\u{e9} \"\u{732b}\""), ["caf\u{e9}", "\u{732b}"]);
    }

    #[test]
    fn words_report_unclosed_quotes_with_column() {
        assert_eq!(
            split_words(r#"--prompt "a cat"#).unwrap_err(),
            "unclosed double quote (opened at column 10)"
        );
        assert_eq!(
            split_words("--prompt 'a cat").unwrap_err(),
            "unclosed single quote (opened at column 10)"
        );
        assert_eq!(
            split_words(r"a b\").unwrap_err(),
            "a backslash at the end of the line (column 4) escapes nothing"
        );
    }

    // -- text lines -------------------------------------------------------------------------

    #[test]
    fn plain_lines_are_prompts_and_comments_are_skipped() {
        assert_eq!(
            parse_text_line("  a red fox  ").unwrap(),
            Some(spec("a red fox"))
        );
        assert_eq!(parse_text_line("# a comment").unwrap(), None);
        assert_eq!(parse_text_line("   # indented comment").unwrap(), None);
        assert_eq!(parse_text_line("").unwrap(), None);
        assert_eq!(parse_text_line(" \t").unwrap(), None);
        // A '#' later in the line is part of the prompt; so are quotes and a lone dash pair.
        assert_eq!(
            parse_text_line("a #1 \"best\" cat -- really").unwrap(),
            Some(spec("a #1 \"best\" cat -- really"))
        );
    }

    #[test]
    fn a1111_lines_take_every_option() {
        let s = parse_text_line(
            r#"--prompt "a cat, oil" --negative_prompt 'blurry, dark' --seed 5 --steps 30 --cfg_scale 7 --width 512 --height 768 --sampler_name "DPM++ 2M" --batch_size 2 --n_iter 3"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s,
            LineSpec {
                prompt: "a cat, oil".into(),
                negative_prompt: Some("blurry, dark".into()),
                seed: Some(5),
                steps: Some(30),
                cfg_scale: Some(7.0),
                width: Some(512),
                height: Some(768),
                scheduler: Some(SchedulerKind::DpmPp2m),
                karras: Some(false),
                batch_size: Some(2),
                n_iter: Some(3),
            }
        );
    }

    #[test]
    fn a1111_prompt_runs_on_until_the_next_option() {
        let s = parse_text_line("--prompt a cat  on a mat --negative_prompt dog bark --steps 4")
            .unwrap()
            .unwrap();
        assert_eq!(s.prompt, "a cat on a mat");
        assert_eq!(s.negative_prompt.as_deref(), Some("dog bark"));
        assert_eq!(s.steps, Some(4));
    }

    #[test]
    fn a1111_variants_equals_dashes_seed_minus_one_karras() {
        let s = parse_text_line(
            "--prompt=\"a b\" --negative-prompt=x --cfg-scale=4.5 --seed -1 \
             --sampler_name 'DPM++ 2M Karras'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.prompt, "a b");
        assert_eq!(s.negative_prompt.as_deref(), Some("x"));
        assert_eq!(s.cfg_scale, Some(4.5));
        assert_eq!(s.seed, None);
        assert_eq!(s.scheduler, Some(SchedulerKind::DpmPp2m));
        assert_eq!(s.karras, Some(true));

        let s = parse_text_line("--prompt x --scheduler euler --karras true")
            .unwrap()
            .unwrap();
        assert_eq!(
            (s.scheduler, s.karras),
            (Some(SchedulerKind::Euler), Some(true))
        );
        // latent's own names work in sampler_name too; no Karras suffix means karras off.
        let s = parse_text_line("--prompt x --sampler_name euler-a")
            .unwrap()
            .unwrap();
        assert_eq!(
            (s.scheduler, s.karras),
            (Some(SchedulerKind::EulerAncestral), Some(false))
        );
        // Empty negative prompt, quoted.
        let s = parse_text_line("--prompt x --negative_prompt \"\"")
            .unwrap()
            .unwrap();
        assert_eq!(s.negative_prompt.as_deref(), Some(""));
    }

    #[test]
    fn a1111_sampler_names_map_onto_schedulers() {
        let cases = [
            ("Euler a", SchedulerKind::EulerAncestral, false),
            ("Euler", SchedulerKind::Euler, false),
            ("Euler Karras", SchedulerKind::Euler, true),
            ("DPM++ 2M", SchedulerKind::DpmPp2m, false),
            ("DPM++ 2M Karras", SchedulerKind::DpmPp2m, true),
            ("dpm++ 2m karras", SchedulerKind::DpmPp2m, true),
            ("DDIM", SchedulerKind::Ddim, false),
            ("PLMS", SchedulerKind::Pndm, false),
            ("k_euler_a", SchedulerKind::EulerAncestral, false),
            ("k_dpmpp_2m_ka", SchedulerKind::DpmPp2m, true),
            ("dpm++2m", SchedulerKind::DpmPp2m, false),
        ];
        for (name, kind, karras) in cases {
            assert_eq!(parse_sampler_name(name), Ok((kind, karras)), "{name}");
            assert_eq!(
                parse_sampler_name(&sampler_name(kind, karras)),
                Ok((kind, karras)),
                "round trip of {name}"
            );
        }
        let e = parse_sampler_name("Heun").unwrap_err();
        assert!(
            e.starts_with("unknown sampler `Heun`; latent has DDIM, PLMS"),
            "{e}"
        );
    }

    #[test]
    fn a1111_line_errors_say_why() {
        let cases = [
            ("--prompt x --foo 1", "unknown option --foo; known: prompt"),
            (
                "--prompt x --tiling true",
                "--tiling: this AUTOMATIC1111 option is not supported",
            ),
            (
                "--prompt x --steps ten",
                "--steps ten: expected a whole number of at least 1",
            ),
            ("--prompt x --steps 0", "--steps 0: must be at least 1"),
            ("--prompt x --steps", "--steps needs a value"),
            ("--prompt x --steps --seed 1", "--steps needs a value"),
            (
                "--prompt x --width -8",
                "--width -8: expected a whole number",
            ),
            (
                "--prompt x --cfg_scale abc",
                "--cfg_scale abc: expected a number",
            ),
            (
                "--prompt x --cfg_scale inf",
                "--cfg_scale inf: must be a finite number",
            ),
            (
                "--prompt x --seed -2",
                "--seed -2: expected a whole number >= 0, or -1",
            ),
            (
                "--prompt x --karras yes",
                "--karras yes: expected true or false",
            ),
            (
                "--prompt x --sampler_name Heun",
                "--sampler_name: unknown sampler `Heun`",
            ),
            (
                "--prompt x --scheduler lms",
                "--scheduler: unknown scheduler `lms`",
            ),
            ("--prompt x --seed 1 --seed 2", "--seed is given twice"),
            (
                "--prompt x --sampler_name DDIM --scheduler ddim",
                "give either sampler_name or scheduler",
            ),
            (
                "--prompt x --sampler_name 'Euler Karras' --karras false",
                "karras is false but sampler_name asks for Karras",
            ),
            ("--steps 3", "no --prompt on this line"),
            ("--prompt \"\" --steps 3", "--prompt is empty"),
            (
                "--prompt \"a cat",
                "unclosed double quote (opened at column 10)",
            ),
            ("a cat --steps 5", "`--steps` in the middle of a prompt"),
        ];
        for (line, want) in cases {
            let e = opt_err(line);
            assert!(e.starts_with(want), "{line}: got {e:?}, want {want:?}");
        }
        assert_eq!(
            opt_err("x --prompt y"),
            "`--prompt` in the middle of a prompt: options must come first, and the prompt goes \
             in --prompt \"...\""
        );
        assert_eq!(
            opt_err("--prompt x 'y"),
            "unclosed single quote (opened at column 12)"
        );
    }

    // -- JSON lines -------------------------------------------------------------------------

    #[test]
    fn json_lines_use_the_same_names() {
        let s = parse_json_line(
            r#"{"prompt": "a cat", "negative_prompt": "dog", "seed": 7, "steps": 3, "cfg_scale": 6.5, "width": 64, "height": 128, "sampler_name": "Euler a", "n_iter": 2}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s,
            LineSpec {
                prompt: "a cat".into(),
                negative_prompt: Some("dog".into()),
                seed: Some(7),
                steps: Some(3),
                cfg_scale: Some(6.5),
                width: Some(64),
                height: Some(128),
                scheduler: Some(SchedulerKind::EulerAncestral),
                karras: Some(false),
                batch_size: None,
                n_iter: Some(2),
            }
        );
        assert_eq!(parse_json_line("# note").unwrap(), None);
        assert_eq!(parse_json_line("   ").unwrap(), None);
        let s = parse_json_line(
            r#"{"prompt": "x", "seed": -1, "karras": true, "scheduler": "dpm++2m"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!((s.seed, s.karras), (None, Some(true)));
        let s = parse_json_line(r#"{"prompt": "x", "seed": null}"#)
            .unwrap()
            .unwrap();
        assert_eq!(s.seed, None);
    }

    #[test]
    fn json_line_errors_say_why() {
        let cases = [
            (
                r#"{"prompt": "x", "steps": "30"}"#,
                "`steps`: expected a whole number, found a string",
            ),
            (
                r#"{"prompt": "x", "steps": 2.5}"#,
                "`steps` 2.5: expected a whole number",
            ),
            (
                r#"{"prompt": "x", "width": -64}"#,
                "`width` -64: expected a whole number",
            ),
            (
                r#"{"prompt": "x", "cfg_scale": "7"}"#,
                "`cfg_scale`: expected a number, found a string",
            ),
            (
                r#"{"prompt": 5}"#,
                "`prompt`: expected a string, found a number",
            ),
            (
                r#"{"prompt": "x", "karras": 1}"#,
                "`karras`: expected true or false, found a number",
            ),
            (
                r#"{"prompt": "x", "colour": "red"}"#,
                "unknown option `colour`",
            ),
            (r#"{"steps": 3}"#, "no `prompt` on this line"),
            (r#"["a cat"]"#, "expected a JSON object"),
            (r#"{"prompt": "x""#, "not valid JSON"),
            ("a cat", "not valid JSON"),
        ];
        for (line, want) in cases {
            let e = parse_json_line(line).unwrap_err();
            assert!(e.starts_with(want), "{line}: got {e:?}, want {want:?}");
        }
    }

    // -- files ------------------------------------------------------------------------------

    #[test]
    fn files_keep_line_numbers_for_lines_and_errors() {
        let f = text(
            "\u{FEFF}# header\n\na cat\r\n--prompt dog --steps 0\n--prompt \"fox\" --seed 3\n\n--bogus 1\n",
        );
        let got: Vec<(usize, &str)> = f
            .lines
            .iter()
            .map(|l| (l.line, l.spec.prompt.as_str()))
            .collect();
        assert_eq!(got, [(3, "a cat"), (5, "fox")]);
        let errs: Vec<String> = f.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errs,
            [
                "p.txt:4: --steps 0: must be at least 1",
                "p.txt:7: unknown option --bogus; known: prompt, negative_prompt, seed, steps, \
                 cfg_scale, width, height, sampler_name, scheduler, karras, batch_size, n_iter"
            ]
        );
        let f = parse_prompt_text(
            Path::new("p.jsonl"),
            "{\"prompt\": \"a\"}\n\n# c\n{\"prompt\": 1}\n",
            Format::Jsonl,
        )
        .unwrap();
        assert_eq!(f.lines[0].line, 1);
        assert_eq!(f.errors[0].line, 4);
    }

    #[test]
    fn empty_and_comment_only_files_are_errors() {
        let e = parse_prompt_text(Path::new("e.txt"), "", Format::Text).unwrap_err();
        assert_eq!(e.to_string(), "e.txt: the file is empty");
        let e = parse_prompt_text(Path::new("e.txt"), " \n\n", Format::Text).unwrap_err();
        assert_eq!(e.to_string(), "e.txt: the file is empty");
        let e = parse_prompt_text(Path::new("e.txt"), "# only\n\n# comments\n", Format::Text)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "e.txt: no prompts in the file (only comments and blank lines)"
        );
    }

    #[test]
    fn non_utf8_and_utf16_files_are_errors_with_the_line() {
        let e = decode_utf8(Path::new("x.txt"), b"ok\nfine\ncaf\xe9\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.txt:3: the file is not valid UTF-8 (byte 11 is 0xE9); save it as UTF-8"
        );
        let e = decode_utf8(Path::new("x.txt"), b"\xff\xfea\x00").unwrap_err();
        assert_eq!(e.to_string(), "x.txt: the file is UTF-16; save it as UTF-8");
    }

    #[test]
    fn formats_come_from_extensions_or_the_flag() {
        assert_eq!(
            Format::from_extension(Path::new("a.TXT")),
            Some(Format::Text)
        );
        assert_eq!(
            Format::from_extension(Path::new("a.jsonl")),
            Some(Format::Jsonl)
        );
        assert_eq!(Format::from_extension(Path::new("a.csv")), None);
        assert_eq!(Format::from_extension(Path::new("prompts")), None);
        assert_eq!("JSONL".parse::<Format>().unwrap(), Format::Jsonl);
        assert_eq!("a1111".parse::<Format>().unwrap(), Format::Text);
        assert!("csv".parse::<Format>().is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("list.csv");
        fs::write(&p, "a cat\n").unwrap();
        let e = read_prompt_file(&p, None).unwrap_err().to_string();
        assert!(e.contains("pass --format text or --format jsonl"), "{e}");
        assert_eq!(
            read_prompt_file(&p, Some(Format::Text))
                .unwrap()
                .lines
                .len(),
            1
        );
        let e = read_prompt_file(&dir.path().join("none.txt"), None).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }

    // -- plan -------------------------------------------------------------------------------

    fn defaults() -> Defaults {
        Defaults {
            negative_prompt: "ugly".into(),
            sampling: Sampling {
                width: 64,
                height: 64,
                steps: 3,
                guidance: 7.5,
                scheduler: SchedulerKind::Pndm,
                karras: false,
                rng: RngKind::Torch,
                size_conditioning: Default::default(),
                preview_every: None,
            },
            repeat: 2,
        }
    }

    fn no_check(_: &Job) -> Result<()> {
        Ok(())
    }

    #[test]
    fn defaults_apply_and_lines_override_them() {
        let f = text(
            "a cat\n--prompt dog --negative_prompt none --steps 5 --cfg_scale 1 --width 96 \
             --sampler_name 'Euler Karras' --seed 100 --n_iter 3\n--prompt fox --batch_size 1\n",
        );
        let plan = Plan::new(&[f], &defaults(), 1000, &no_check);
        assert!(plan.errors.is_empty());
        let summary: Vec<(usize, &str, u64, SeedFrom)> = plan
            .jobs
            .iter()
            .map(|j| (j.index, j.prompt.as_str(), j.seed, j.seed_from))
            .collect();
        assert_eq!(
            summary,
            [
                // Defaults: repeat 2, run seed + index.
                (0, "a cat", 1000, SeedFrom::Run),
                (1, "a cat", 1001, SeedFrom::Run),
                // Own seed: seed + k, n_iter 3 overrides repeat.
                (2, "dog", 100, SeedFrom::Line),
                (3, "dog", 101, SeedFrom::Line),
                (4, "dog", 102, SeedFrom::Line),
                // batch_size 1 alone: one image.
                (5, "fox", 1005, SeedFrom::Run),
            ]
        );
        let cat = &plan.jobs[0];
        assert_eq!(cat.negative_prompt, "ugly");
        assert_eq!(
            (cat.sampling.width, cat.sampling.height, cat.sampling.steps),
            (64, 64, 3)
        );
        assert_eq!(cat.sampling.scheduler, SchedulerKind::Pndm);
        let dog = &plan.jobs[2];
        assert_eq!(dog.negative_prompt, "none");
        assert_eq!((dog.sampling.width, dog.sampling.height), (96, 64));
        assert_eq!((dog.sampling.steps, dog.sampling.guidance), (5, 1.0));
        assert_eq!(
            (dog.sampling.scheduler, dog.sampling.karras),
            (SchedulerKind::Euler, true)
        );
        assert_eq!(dog.source(), "p.txt:2");
    }

    #[test]
    fn validation_failures_become_line_errors_and_make_no_items() {
        let f = text("a cat\n--prompt dog --width 100\n--prompt x --bad 1\nfox\n");
        let check = |j: &Job| {
            if j.sampling.width.is_multiple_of(8) {
                Ok(())
            } else {
                Err(Error::InvalidInput(format!(
                    "--width {}: must be a positive multiple of 8",
                    j.sampling.width
                )))
            }
        };
        let plan = Plan::new(&[f], &defaults(), 0, &check);
        let errs: Vec<String> = plan.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 2);
        assert_eq!(
            errs[0],
            "p.txt:2: --width 100: must be a positive multiple of 8"
        );
        assert!(errs[1].starts_with("p.txt:3: unknown option --bad"));
        let got: Vec<(usize, &str)> = plan
            .jobs
            .iter()
            .map(|j| (j.index, j.prompt.as_str()))
            .collect();
        assert_eq!(got, [(0, "a cat"), (1, "a cat"), (2, "fox"), (3, "fox")]);
    }

    #[test]
    fn indices_run_on_across_files() {
        let a = text("one\n");
        let b = parse_prompt_text(
            Path::new("b.jsonl"),
            "{\"prompt\": \"two\"}\n",
            Format::Jsonl,
        )
        .unwrap();
        let plan = Plan::new(&[a, b], &defaults(), 7, &no_check);
        let got: Vec<(usize, u64, String)> = plan
            .jobs
            .iter()
            .map(|j| (j.index, j.seed, j.source()))
            .collect();
        assert_eq!(
            got,
            [
                (0, 7, "p.txt:1".to_string()),
                (1, 8, "p.txt:1".to_string()),
                (2, 9, "b.jsonl:1".to_string()),
                (3, 10, "b.jsonl:1".to_string()),
            ]
        );
    }

    #[test]
    fn seed_overflow_is_a_line_error() {
        let f = text(&format!("--prompt x --seed {} --n_iter 2\n", u64::MAX));
        let plan = Plan::new(&[f], &defaults(), 0, &no_check);
        assert_eq!(plan.jobs.len(), 0);
        assert_eq!(
            plan.errors[0].to_string(),
            "p.txt:1: the seed + image number overflows 64 bits"
        );
    }

    // -- grouping ---------------------------------------------------------------------------

    #[test]
    fn groups_share_every_sampling_setting_and_keep_item_order() {
        let f = text(
            "a\n--prompt b --steps 4\n--prompt c --negative_prompt other --seed 9\n\
             --prompt d --cfg_scale 7.5\n--prompt e --cfg_scale 7.25\n--prompt f --sampler_name DDIM\n\
             --prompt g --width 72\n--prompt h --steps 4\n",
        );
        let mut d = defaults();
        d.repeat = 1;
        let plan = Plan::new(&[f], &d, 0, &no_check);
        let groups = group_jobs(&plan.jobs);
        let prompts: Vec<Vec<&str>> = groups
            .iter()
            .map(|g| g.jobs.iter().map(|j| j.prompt.as_str()).collect())
            .collect();
        assert_eq!(
            prompts,
            [
                vec!["a", "c", "d"],
                vec!["b", "h"],
                vec!["e"],
                vec!["f"],
                vec!["g"]
            ]
        );
        let sizes: Vec<usize> = groups[0].batches(2).map(|b| b.len()).collect();
        assert_eq!(sizes, [2, 1]);
        let sizes: Vec<usize> = groups[0].batches(4).map(|b| b.len()).collect();
        assert_eq!(sizes, [3]);
    }

    // -- names ------------------------------------------------------------------------------

    fn job(index: usize, seed: u64, prompt: &str) -> Job {
        Job {
            index,
            path: PathBuf::from("dir/My Prompts.txt"),
            line: 4,
            prompt: prompt.into(),
            negative_prompt: String::new(),
            sampling: defaults().sampling,
            seed,
            seed_from: SeedFrom::Run,
        }
    }

    #[test]
    fn default_template_names_files_like_a1111_with_a_slug() {
        let t: NameTemplate = DEFAULT_TEMPLATE.parse().unwrap();
        assert_eq!(
            t.render(&job(3, 42, "A photo of a cat, (masterpiece:1.2)!")),
            Path::new("00003-42-a_photo_of_a_cat_masterpiece_1_2.png")
        );
        assert_eq!(t.render(&job(123456, 1, "x")), Path::new("123456-1-x.png"));
        let t: NameTemplate = "{file}/{line}-{index:03}-{width}x{height}-{steps}-{{x}}.PNG"
            .parse()
            .unwrap();
        assert_eq!(
            t.render(&job(5, 1, "x")),
            Path::new("my_prompts/4-005-64x64-3-{x}.PNG")
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        let cases = [
            ("{index}.jpg", "must end in .png"),
            ("{nope}.png", "unknown field {nope}"),
            ("{index.png", "a `{` is never closed"),
            ("a}.png", "a `}` without `{`"),
            ("{prompt_slug:05}.png", "the only format is zero padding"),
            ("{index:5}.png", "the only format is zero padding"),
            ("/abs/{index}.png", "must be a relative path"),
            ("../{index}.png", "must be a relative path"),
            ("a//{index}.png", "must be a relative path"),
            (r"a\{index}.png", "use / for subfolders"),
        ];
        for (t, want) in cases {
            let e = t.parse::<NameTemplate>().unwrap_err().to_string();
            assert!(e.contains(want), "{t}: got {e}, want {want}");
        }
    }

    #[test]
    fn templates_that_give_two_items_one_name_are_refused() {
        let t: NameTemplate = "{prompt_slug}.png".parse().unwrap();
        let e = t
            .assign(&[job(0, 1, "cat"), job(1, 2, "dog"), job(2, 3, "cat")])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--filename gives items 0 (dir/My Prompts.txt:4) and 2 (dir/My Prompts.txt:4) the \
             same file cat.png; add {index} to the template"
        );
        let t: NameTemplate = DEFAULT_TEMPLATE.parse().unwrap();
        assert_eq!(
            t.assign(&[job(0, 1, "cat"), job(1, 1, "cat")])
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn slugs_are_safe_short_and_never_empty() {
        assert_eq!(prompt_slug("Hello, World!"), "hello_world");
        assert_eq!(prompt_slug("  ../../etc/passwd  "), "etc_passwd");
        assert_eq!(prompt_slug("a:b*c?d\"e<f>g|h\\i/j"), "a_b_c_d_e_f_g_h_i_j");
        assert_eq!(prompt_slug("Ünïcödé 猫 ok"), "ünïcödé_猫_ok");
        assert_eq!(prompt_slug("!!!"), "prompt");
        assert_eq!(prompt_slug(""), "prompt");
        assert_eq!(prompt_slug("CON"), "con_");
        assert_eq!(prompt_slug("com1"), "com1_");
        assert_eq!(prompt_slug("console"), "console");
        let long = "word ".repeat(40);
        let s = prompt_slug(&long);
        assert!(s.len() <= SLUG_MAX_BYTES, "{s}");
        assert!(s.ends_with("word"), "cut at a word boundary: {s}");
        let one_word = "x".repeat(100);
        assert_eq!(prompt_slug(&one_word).len(), SLUG_MAX_BYTES);
        // Multi-byte characters are never split.
        let cats = "猫".repeat(40);
        let s = prompt_slug(&cats);
        assert!(
            s.len() <= SLUG_MAX_BYTES && s.chars().all(|c| c == '猫'),
            "{s}"
        );
    }

    // -- manifest ---------------------------------------------------------------------------

    fn record(j: &Job, file: &str) -> Record {
        let run = RunInfo {
            run_seed: 1,
            model: "tiny".into(),
            device: "Cpu".into(),
            dtype: "f32".into(),
        };
        Record::new(j, Path::new(file), &run, Some(2), "params".into(), None)
    }

    #[test]
    fn manifest_round_trips_and_keys_match_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out").join(MANIFEST_NAME);
        let mut j = job(0, 5, "cat");
        j.sampling.guidance = 0.1 + 0.2; // not exactly representable in decimal
        let r0 = record(&j, "a/x.png");
        {
            let (mut m, contents) = Manifest::open(&path).unwrap();
            assert!(contents.records.is_empty());
            m.append(&r0).unwrap();
            m.append(&record(&job(1, 6, "dog"), "y.png")).unwrap();
        }
        let c = Manifest::read(&path).unwrap();
        assert_eq!(c.records.len(), 2);
        assert_eq!(c.records[0], r0);
        assert_eq!(c.records[0].key(), j.key("tiny"));
        assert_ne!(c.records[0].key(), j.key("other model"));
        assert_eq!(c.records[0].file, "a/x.png");
        assert_eq!(c.records[0].sampler_name, "PLMS");

        // Only records whose file exists count as finished.
        let out = dir.path().join("out");
        fs::write(out.join("y.png"), b"").unwrap();
        let finished = Finished::new(&out, &c.records);
        assert_eq!(finished.len(), 1);
        assert_eq!(finished.file(&job(1, 6, "dog").key("tiny")), Some("y.png"));
        assert_eq!(finished.file(&j.key("tiny")), None);
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_a_corrupt_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_NAME);
        let good = serde_json::to_string(&record(&job(0, 5, "cat"), "x.png")).unwrap();
        fs::write(&path, format!("{good}\n{}", &good[..good.len() / 2])).unwrap();
        let (mut m, c) = Manifest::open(&path).unwrap();
        assert_eq!(c.records.len(), 1);
        assert!(c.torn.is_some());
        m.append(&record(&job(1, 6, "dog"), "y.png")).unwrap();
        drop(m);
        let c = Manifest::read(&path).unwrap();
        assert_eq!(c.records.len(), 2);
        assert!(c.torn.is_none());

        // A complete last record without its newline is kept and the line ended.
        fs::write(&path, &good).unwrap();
        let (mut m, c) = Manifest::open(&path).unwrap();
        assert_eq!((c.records.len(), c.torn.is_none()), (1, true));
        m.append(&record(&job(1, 6, "dog"), "y.png")).unwrap();
        assert_eq!(Manifest::read(&path).unwrap().records.len(), 2);

        fs::write(&path, format!("{good}\n{{broken\n{good}\n")).unwrap();
        let e = Manifest::read(&path).unwrap_err().to_string();
        assert!(e.contains("manifest.jsonl:2: not a manifest record"), "{e}");
        assert!(Manifest::open(&path).is_err());
    }
}
