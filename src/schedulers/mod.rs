//! Noise schedulers behind one trait that mirrors diffusers' scheduler API.
//!
//! Each algorithm lives in its own file and reproduces one diffusers class: the timesteps and
//! sigmas bit for bit (diffusers mixes torch float32 and numpy float64 at fixed points; the
//! shared math in `math.rs` follows it stage by stage) and the step with the same float32
//! operations. `build` makes one from a model's `scheduler/scheduler_config.json`
//! ([`SchedulerConfig`]) the way `Target.from_config(pipe.scheduler.config)` does in diffusers.
use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

use crate::noise::NoiseSource;
use crate::{Error, Result, Setting};

mod config;
mod ddim;
mod denoised;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod lcm;
mod math;
mod pndm;

pub use config::SchedulerConfig;
pub use denoised::DenoisedEstimate;

/// One denoising algorithm, configured for a fixed number of inference steps.
///
/// Mirrors diffusers: the loop runs over `timesteps()`; for loop position `i` the caller scales
/// the latents with `scale_model_input(x, i)`, runs the model at `timesteps()[i]`, then calls
/// `step(model_output, i, x, noise)` to get the next latents. All math is done in f32 on the
/// latents' device (inputs of another dtype are converted; `step` and `add_noise` return f32);
/// per-step constants come from the schedule computed on the host.
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
    /// The noise levels of the Karras-style schedulers (diffusers' `scheduler.sigmas`: one per
    /// timestep plus the final one), as float32 like diffusers stores them; `None` for DDIM,
    /// PNDM and LCM, which work on `alphas_cumprod` instead.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

/// The schedulers `latent` implements, by their command-line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// DDIM, deterministic (eta = 0): diffusers' `DDIMScheduler`.
    Ddim,
    /// PNDM / PLMS: diffusers' `PNDMScheduler` (SD 1.x's default).
    Pndm,
    /// Euler: diffusers' `EulerDiscreteScheduler`.
    Euler,
    /// Euler ancestral: diffusers' `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// DPM++ 2M: diffusers' `DPMSolverMultistepScheduler` (dpmsolver++, order 2).
    DpmPp2m,
    /// Latent consistency sampling: diffusers' `LCMScheduler`, for LCM-distilled models and
    /// LCM-LoRA (1-8 steps).
    Lcm,
}

impl SchedulerKind {
    /// Every kind, in the order help texts list them.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::Lcm,
    ];

    /// The command-line names of [`ALL`](Self::ALL), comma-separated, for help and error texts.
    pub fn cli_names() -> String {
        SchedulerKind::ALL
            .iter()
            .map(|k| k.cli_name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The command-line name ("ddim", "pndm", "euler", "euler-a", "dpm++2m", "lcm").
    pub fn cli_name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpm++2m",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// The sampler's name in AUTOMATIC1111's web UI, used in PNG metadata.
    pub fn a1111_name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Pndm => "PLMS",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmPp2m => "DPM++ 2M",
            SchedulerKind::Lcm => "LCM",
        }
    }

    /// The diffusers class this kind reproduces.
    pub fn diffusers_class(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPp2m => "DPMSolverMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
        }
    }

    /// The kind for a diffusers class name (`_class_name` of a scheduler_config.json), if
    /// `latent` implements that class.
    pub fn from_class_name(name: &str) -> Option<SchedulerKind> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.diffusers_class() == name)
    }

    /// Whether `--karras` works with this kind: the diffusers class has `use_karras_sigmas`
    /// (diffusers 0.42 gives it to Euler and DPM++ 2M, not to Euler ancestral or LCM).
    pub fn supports_karras(&self) -> bool {
        matches!(self, SchedulerKind::Euler | SchedulerKind::DpmPp2m)
    }

    /// Whether `step` draws fresh noise from the caller's [`NoiseSource`] (Euler ancestral on
    /// every step, LCM between steps), so the result depends on more than the initial latents.
    pub fn draws_noise(&self) -> bool {
        matches!(self, SchedulerKind::EulerAncestral | SchedulerKind::Lcm)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Parses a command-line name, ignoring ASCII case; also accepts "euler_a",
    /// "euler-ancestral", "dpmpp-2m", "dpmpp_2m" and "plms".
    fn from_str(s: &str) -> Result<Self> {
        let kind = match s.to_ascii_lowercase().as_str() {
            "ddim" => SchedulerKind::Ddim,
            "pndm" | "plms" => SchedulerKind::Pndm,
            "euler" => SchedulerKind::Euler,
            "euler-a" | "euler_a" | "euler-ancestral" => SchedulerKind::EulerAncestral,
            "dpm++2m" | "dpmpp-2m" | "dpmpp_2m" => SchedulerKind::DpmPp2m,
            "lcm" => SchedulerKind::Lcm,
            _ => {
                return Err(Error::InvalidInput(format!(
                    "unknown scheduler `{s}`; expected one of: {}",
                    SchedulerKind::cli_names()
                )))
            }
        };
        Ok(kind)
    }
}

/// Builds the scheduler of `kind` from a model's scheduler settings, for `num_inference_steps`
/// steps, with Karras sigmas when `karras` is set (Euler and DPM++ 2M only).
///
/// Settings follow diffusers' `Target.from_config(config)`: a key the file lacks takes the
/// target class's default, keys other classes use are ignored, and a key the target class
/// reads with a value `latent` does not implement is an [`Error::Config`] naming the file.
/// A config that sets `use_karras_sigmas` keeps Karras sigmas on, as in diffusers.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    karras: bool,
) -> Result<Box<dyn Scheduler>> {
    if karras && !kind.supports_karras() {
        return Err(Error::setting(
            Setting::Karras,
            "",
            format!(
                "not supported by the {} scheduler (diffusers' {} has no Karras sigmas)",
                kind.a1111_name(),
                kind.diffusers_class()
            ),
        ));
    }
    let train = config.num_train_timesteps()?;
    if num_inference_steps == 0 {
        return Err(Error::setting(Setting::Steps, 0, "must be at least 1"));
    }
    if num_inference_steps > train {
        return Err(Error::setting(
            Setting::Steps,
            num_inference_steps,
            format!(
                "more than the model's {train} training timesteps (num_train_timesteps in {})",
                config.path().display()
            ),
        ));
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, num_inference_steps)?),
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(config, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(config, num_inference_steps, karras)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(
            config,
            num_inference_steps,
        )?),
        SchedulerKind::DpmPp2m => {
            Box::new(dpmpp_2m::DpmPp2m::new(config, num_inference_steps, karras)?)
        }
        SchedulerKind::Lcm => Box::new(lcm::Lcm::new(config, num_inference_steps, 1.0)?),
    })
}

/// [`build`] for an LCM model's img2img, whose strength shortens the LCM distillation schedule
/// (diffusers' `LCMScheduler.set_timesteps(strength=...)`); other schedulers ignore it (their
/// img2img cuts the full schedule instead).
pub fn build_with_strength(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    karras: bool,
    strength: f64,
) -> Result<Box<dyn Scheduler>> {
    match kind {
        SchedulerKind::Lcm => {
            build(kind, config, num_inference_steps, karras)?;
            Ok(Box::new(lcm::Lcm::new(
                config,
                num_inference_steps,
                strength,
            )?))
        }
        _ => build(kind, config, num_inference_steps, karras),
    }
}

/// Checks a loop position against the schedule length.
fn check_index(step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        return Err(Error::InvalidInput(format!(
            "scheduler step {step_index} is past the end of its {len}-step schedule"
        )));
    }
    Ok(())
}

/// Makes sure a tensor is f32 before the scheduler's float32 math.
fn to_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(candle_core::DType::F32)?)
}

/// `t * s` in float32, as torch multiplies a tensor by a 0-dim float32 tensor.
fn mul(t: &Tensor, s: f32) -> Result<Tensor> {
    // candle's affine multiplies by `s as f32`, which is exact here.
    Ok(t.affine(f64::from(s), 0.0)?)
}

/// `t / s` in float32: a true division like torch's, not a multiplication by `1 / s`.
fn div(t: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, t.device())?;
    Ok(t.broadcast_div(&s)?)
}

/// SD 1.5's real scheduler_config.json, for the schedulers' unit tests.
#[cfg(test)]
pub(crate) fn sd15_test_config() -> SchedulerConfig {
    SchedulerConfig::from_json(
        r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "clip_sample": false}"#,
        "sd15.json",
    )
    .expect("valid test config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.to_string().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(
                SchedulerKind::from_class_name(kind.diffusers_class()),
                Some(kind)
            );
        }
        assert_eq!(
            "Euler_A".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::EulerAncestral
        );
        assert_eq!(
            "euler-ancestral".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::EulerAncestral
        );
        assert_eq!(
            "dpmpp_2m".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::DpmPp2m
        );
        assert_eq!(
            "dpmpp-2m".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::DpmPp2m
        );
        assert_eq!(
            "plms".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::Pndm
        );
        let err = "lms".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains("unknown scheduler `lms`"), "{err}");
        assert_eq!(SchedulerKind::from_class_name("LMSDiscreteScheduler"), None);
        assert_eq!(SchedulerKind::EulerAncestral.a1111_name(), "Euler a");
        assert_eq!(SchedulerKind::Pndm.a1111_name(), "PLMS");
        assert_eq!("LCM".parse::<SchedulerKind>().unwrap(), SchedulerKind::Lcm);
        assert_eq!(
            SchedulerKind::from_class_name("LCMScheduler"),
            Some(SchedulerKind::Lcm)
        );
        assert_eq!(SchedulerKind::Lcm.a1111_name(), "LCM");
        assert!(
            err.ends_with("ddim, pndm, euler, euler-a, dpm++2m, lcm"),
            "{err}"
        );
    }

    #[test]
    fn karras_only_where_diffusers_has_it() {
        let config = SchedulerConfig::default();
        for kind in [
            SchedulerKind::Ddim,
            SchedulerKind::Pndm,
            SchedulerKind::EulerAncestral,
            SchedulerKind::Lcm,
        ] {
            let err = build(kind, &config, 10, true).err().unwrap().to_string();
            assert!(
                err.contains(&format!(
                    "karras: not supported by the {} scheduler",
                    kind.a1111_name()
                )),
                "{err}"
            );
        }
        for kind in [SchedulerKind::Euler, SchedulerKind::DpmPp2m] {
            assert!(build(kind, &config, 10, true).is_ok());
        }
    }

    #[test]
    fn step_counts_are_checked() {
        let config = SchedulerConfig::default();
        for kind in SchedulerKind::ALL {
            let err = build(kind, &config, 0, false).err().unwrap().to_string();
            assert!(err.contains("at least 1"), "{err}");
            let err = build(kind, &config, 1001, false).err().unwrap().to_string();
            assert!(err.contains("more than the model's 1000"), "{err}");
        }
    }

    #[test]
    fn step_index_past_the_end_is_an_error() {
        struct NoNoise;
        impl NoiseSource for NoNoise {
            fn randn(&mut self, _shape: &[usize], _device: &candle_core::Device) -> Result<Tensor> {
                Err(Error::InvalidInput("no noise here".into()))
            }
        }
        let config = SchedulerConfig::default();
        let x = Tensor::zeros(
            (1, 4, 2, 2),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for kind in SchedulerKind::ALL {
            let mut s = build(kind, &config, 4, false).unwrap();
            let n = s.timesteps().len();
            let err = s.step(&x, n, &x, &mut NoNoise).err().unwrap().to_string();
            assert!(err.contains("past the end"), "{kind}: {err}");
            assert!(s.scale_model_input(&x, n).is_err());
            assert!(s.add_noise(&x, &x, n).is_err());
        }
    }
}
