//! The library's error type: one enum whose variants carry what a user needs to fix the problem.
use std::path::PathBuf;

/// Everything that can go wrong inside the `latent` library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A required file of a model folder is missing.
    #[error("{path}: file not found{hint}")]
    MissingFile { path: PathBuf, hint: String },
    /// A JSON config could not be parsed.
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    /// A config file lacks a field or holds a value we cannot use.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// A weight file is unreadable (truncated, corrupt, pickle instead of safetensors).
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// A tensor expected by the architecture is absent from the weights.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A LoRA file cannot be applied to the model (not safetensors, keys of unsupported kinds,
    /// layers that match no tensor or do not fit: a LoRA for another model family).
    #[error("LoRA {path}: {message}")]
    Lora { path: PathBuf, message: String },
    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Downloading from the Hugging Face hub failed.
    #[error("hub: {0}")]
    Hub(String),
    /// A user-supplied setting is invalid (size, steps, scheduler name, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// One setting of a run has a value that cannot be used. `setting` is the library's name
    /// for it (`width`, `batch_size`, ...; see [`Setting`]): the command line maps it to its
    /// flag, a server to its JSON field.
    #[error("{}", setting_message(setting.name(), value, reason))]
    Setting {
        setting: Setting,
        value: String,
        reason: String,
    },
    /// A run needs more memory than the machine has available.
    #[error(
        "{what} needs about {needed} of memory, and {available} is available; {advice}",
        needed = gib(*needed),
        available = gib(*available)
    )]
    Memory {
        what: String,
        needed: u64,
        available: u64,
        advice: String,
    },
    /// Denoising or decoding produced NaN or infinite values.
    #[error("{0} produced NaN or infinite values; the image would be black")]
    NonFinite(String),
    /// Another run holds the lock of an output folder.
    #[error("{path} is in use by another latent run{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { path: PathBuf, pid: Option<u32> },
    /// The disk is full: the run stops at the first such write.
    #[error("{path}: no space left on device")]
    DiskFull { path: PathBuf },
    /// An output folder holds files of another run (or another walk) that this run would
    /// replace; only overwriting, which the caller must ask for, replaces them.
    #[error("{path}: {reason}; allow overwriting to replace it, or choose another folder")]
    Occupied { path: PathBuf, reason: String },
    /// A run stopped on an error after part of its work was on disk (e.g. a full disk): says
    /// how much, so the user knows that running it again resumes.
    #[error("{source}; stopped with {done} of {total} frames on disk in {path}; run it again to resume once that is fixed")]
    Stopped {
        path: PathBuf,
        done: usize,
        total: usize,
        source: Box<Error>,
    },
    /// An image could not be encoded, decoded or written.
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },
    /// An interrupt ([`crate::Cancel::interrupt`]) stopped the run between two denoising steps.
    #[error("interrupted")]
    Interrupted,
    /// A skip ([`crate::Cancel::skip`]) abandoned the batch in flight between two denoising
    /// steps; the run goes on with the next batch.
    #[error("skipped")]
    Skipped,
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The settings of a run, by the library's names for them. Errors name the setting; the
/// command line and a server map it to their own spelling (`-W/--width`, `"width"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Setting {
    Prompt,
    NegativePrompt,
    Width,
    Height,
    Steps,
    Guidance,
    Scheduler,
    Karras,
    Seed,
    NumImages,
    BatchSize,
    Repeat,
    MaxImages,
    Latents,
    PreviewEvery,
    SizeConditioning,
    Frames,
    Fps,
    Format,
    FileName,
    Shard,
    Output,
    Vae,
    Device,
    Model,
    Revision,
    /// The folder whose shard manifests are merged.
    Merge,
    /// How prompts are read (AUTOMATIC1111's syntax or plain text).
    PromptSyntax,
    /// AUTOMATIC1111's "clip skip".
    ClipSkip,
    /// Textual-inversion embeddings (a folder or file).
    Embeddings,
    /// The image img2img and inpainting start from.
    InitImage,
    /// How much of the init image is redrawn (img2img's strength).
    Strength,
    /// The inpainting mask (white: redrawn).
    Mask,
    /// A LoRA (a file, or a name in the LoRA folder).
    Lora,
    /// The folder `<lora:NAME>` tags are looked up in.
    LoraDir,
    /// What a single-file checkpoint is (family and prediction type).
    ModelType,
    /// A diffusers folder whose configs describe a single-file checkpoint.
    ModelConfig,
}

impl Setting {
    /// The library's name of the setting, as in prompt files and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Prompt => "prompt",
            Setting::NegativePrompt => "negative_prompt",
            Setting::Width => "width",
            Setting::Height => "height",
            Setting::Steps => "steps",
            Setting::Guidance => "guidance",
            Setting::Scheduler => "scheduler",
            Setting::Karras => "karras",
            Setting::Seed => "seed",
            Setting::NumImages => "num_images",
            Setting::BatchSize => "batch_size",
            Setting::Repeat => "repeat",
            Setting::MaxImages => "max_images",
            Setting::Latents => "latents",
            Setting::PreviewEvery => "preview_every",
            Setting::SizeConditioning => "size_conditioning",
            Setting::Frames => "frames",
            Setting::Fps => "fps",
            Setting::Format => "format",
            Setting::FileName => "filename",
            Setting::Shard => "shard",
            Setting::Output => "output",
            Setting::Vae => "vae",
            Setting::Device => "device",
            Setting::Model => "model",
            Setting::Revision => "revision",
            Setting::Merge => "merge",
            Setting::PromptSyntax => "prompt_syntax",
            Setting::ClipSkip => "clip_skip",
            Setting::Embeddings => "embeddings",
            Setting::InitImage => "init_image",
            Setting::Strength => "strength",
            Setting::Mask => "mask",
            Setting::Lora => "lora",
            Setting::LoraDir => "lora_dir",
            Setting::ModelType => "model_type",
            Setting::ModelConfig => "model_config",
        }
    }
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `width 65: reason`, or `karras: reason` for a setting whose value says nothing (an empty
/// `value`). The command line uses the same form with the flag in place of the name.
pub fn setting_message(name: &str, value: &str, reason: &str) -> String {
    if value.is_empty() {
        format!("{name}: {reason}")
    } else {
        format!("{name} {value}: {reason}")
    }
}

/// Bytes as GiB with one decimal (`12.3 GiB`), or MiB below one GiB.
fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", (b / (1u64 << 20) as f64).ceil())
    }
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// True for "no space left on device" and "disk quota exceeded".
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl Error {
    /// Wraps an io error with the path it concerns; a full disk becomes [`Error::DiskFull`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if is_disk_full(&source) {
            return Error::DiskFull { path: path.into() };
        }
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// `setting` cannot take `value`, for `reason`.
    pub fn setting(
        setting: Setting,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Error::Setting {
            setting,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// True when the error is a full disk (or quota): going on would fail the same way.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::DiskFull { .. } => true,
            Error::Stopped { source, .. } => source.is_disk_full(),
            Error::Io { source, .. } => is_disk_full(source),
            _ => false,
        }
    }

    /// A config problem for `field` in the file at `path`.
    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
