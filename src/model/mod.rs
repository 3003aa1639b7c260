//! Finding and loading a model: local folder or hub id, config parsing, component weights.
pub mod weights;

pub use weights::Weights;
