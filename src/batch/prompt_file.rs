//! Prompt files: formats, reading and parsing plain text, AUTOMATIC1111 option lines and
//! JSONL into line specs, with line errors naming file and line.
use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use crate::schedulers::SchedulerKind;
use crate::{Error, Result};

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

impl PromptFile {
    /// A prompt source that is not a file (a server's request): `specs` become lines 1, 2, ...
    /// and `name` stands for the file in records and messages (`name:1`).
    pub fn in_memory(name: &str, specs: Vec<LineSpec>) -> PromptFile {
        PromptFile {
            path: PathBuf::from(name),
            format: Format::Jsonl,
            lines: specs
                .into_iter()
                .enumerate()
                .map(|(i, spec)| Line { line: i + 1, spec })
                .collect(),
            errors: Vec::new(),
        }
    }
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
pub(super) fn decode_utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
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
