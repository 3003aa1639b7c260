//! Finding and loading a model: local folder or hub id, config parsing, component weights.
pub mod config;
pub mod layers;
pub mod source;
pub mod unet;
pub mod vae;
pub mod weights;

pub use config::{ConfigFile, UNetConfig, VaeConfig};
pub use source::{ModelFiles, ModelSource};
pub use unet::UNet;
pub use vae::VaeDecoder;
pub use weights::Weights;
