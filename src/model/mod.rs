//! Finding and loading a model: local folder or hub id, config parsing, component weights.
pub mod autoencoder;
pub mod config;
pub mod family;
pub mod layers;
pub mod single_file;
pub mod source;
pub mod tiny_vae;
pub mod unet;
pub mod vae;
pub mod vae_encoder;
pub mod weights;

pub use config::{ConfigFile, TextTimeConfig, UNetConfig, VaeConfig};
pub use source::{ModelFiles, ModelSource};
pub use tiny_vae::{TinyVaeConfig, TinyVaeDecoder, TinyVaeEncoder, VaeKind};
pub use unet::{guidance_scale_embedding, AddedConditioning, UNet};
pub use vae::VaeDecoder;
pub use vae_encoder::VaeEncoder;
pub use weights::Weights;
