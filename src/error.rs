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
    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Downloading from the Hugging Face hub failed.
    #[error("hub: {0}")]
    Hub(String),
    /// A user-supplied setting is invalid (size, steps, scheduler name, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// An image could not be encoded, decoded or written.
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },
    /// The run was cancelled through the progress callback.
    #[error("cancelled")]
    Cancelled,
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an io error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
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
