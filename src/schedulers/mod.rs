//! Noise schedulers behind one trait that mirrors diffusers' scheduler API.
use candle_core::Tensor;

use crate::noise::NoiseSource;
use crate::Result;

/// One denoising algorithm, configured for a fixed number of inference steps.
///
/// Mirrors diffusers: the loop runs over `timesteps()`; for loop position `i` the caller scales
/// the latents with `scale_model_input(x, i)`, runs the model at `timesteps()[i]`, then calls
/// `step(model_output, i, x, noise)` to get the next latents. All math is done in f32 on the
/// latents' device; per-step constants come from the schedule computed on the host.
pub trait Scheduler: Send {
    /// The loop's timesteps in order (diffusers' `scheduler.timesteps`); floats because
    /// Euler-family schedulers interpolate them.
    fn timesteps(&self) -> &[f64];
    /// Standard deviation of the initial noise (diffusers' `init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64;
    /// Scales the model input at loop position `step_index`.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;
    /// One step at loop position `step_index`: returns the previous (less noisy) sample.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// Noises `original` to the level of loop position `step_index` (img2img).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
}
