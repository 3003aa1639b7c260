//! `latent`: text-to-image generation with latent diffusion models (Stable Diffusion 1.x/2.x,
//! SDXL, their Turbo and LCM variants) on candle.
pub mod batch;
pub mod cancel;
pub mod conditioning;
pub mod demo;
pub mod device;
pub mod error;
pub mod files;
pub mod generate;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod noise;
pub mod npy;
pub mod output;
pub mod pipeline;
pub mod preview;
pub mod prompt;
pub mod resources;
pub mod schedulers;
pub mod serve;
pub mod text;
pub mod walk;

pub use cancel::Cancel;
pub use error::{Error, Result, Setting};
