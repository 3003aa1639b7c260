//! Seeded noise made on the host (candle cannot seed its CPU generator), moved to the device afterwards.
use candle_core::{Device, Tensor};

use crate::Result;

/// A source of standard normal noise for a batch of images.
///
/// Row `i` of every tensor it returns (the first dimension is the batch) is drawn from
/// image `i`'s own generator, in the order diffusers draws with a list of generators.
pub trait NoiseSource {
    /// Draws a float32 tensor of `shape` (first dim = batch) on `device`.
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}
