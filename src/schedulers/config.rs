//! A model's `scheduler/scheduler_config.json`, read with serde, and the settings each
//! scheduler class resolves from it with that class's own defaults.
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::math::{self, Prediction, Spacing};
use super::SchedulerKind;
use crate::{Error, Result};

/// Most training timesteps a scheduler config may declare (diffusers' models use 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// The keys of a diffusers `scheduler_config.json` that `latent`'s schedulers read.
///
/// Every field is `None` when the file lacks the key (or holds `null`): each scheduler then
/// takes its diffusers class's default, exactly as `Target.from_config(config)` does when
/// switching schedulers. Keys for other classes (e.g. `skip_prk_steps` for Euler) and unknown
/// keys are ignored. Values are only judged when a scheduler is built, by the class that reads
/// them.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    path: PathBuf,
    /// `_class_name`: the diffusers class the model ships with.
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    /// "linear", "scaled_linear" or "squaredcos_cap_v2".
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    /// "epsilon", "v_prediction" or "sample".
    pub prediction_type: Option<String>,
    /// "linspace", "leading" or "trailing".
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub rescale_betas_zero_snr: Option<bool>,
    /// DDIM and PNDM: ᾱ used after the last step (1 when set, else ᾱ_0).
    pub set_alpha_to_one: Option<bool>,
    /// DDIM and LCM: clamp the predicted x₀ to ±`clip_sample_range`.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    /// DDIM, LCM and DPM-Solver: dynamic thresholding (not implemented).
    pub thresholding: Option<bool>,
    /// LCM: the length of the distillation schedule the inference timesteps are taken from.
    pub original_inference_steps: Option<usize>,
    /// LCM: the factor on the timestep in the boundary-condition scalings c_skip and c_out.
    pub timestep_scaling: Option<f64>,
    /// PNDM: plain PLMS when set, Runge-Kutta warm-up steps otherwise.
    pub skip_prk_steps: Option<bool>,
    /// Euler: "linear" (the only one implemented) or "log_linear".
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    /// Euler: ends of the Karras schedule, when set.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Euler: "discrete" (implemented) or "continuous".
    pub timestep_type: Option<String>,
    /// Euler and DPM++ 2M: "zero" or "sigma_min", the noise level after the last step.
    pub final_sigmas_type: Option<String>,
    /// DPM-Solver: "dpmsolver++" and order 2 make DPM++ 2M.
    pub algorithm_type: Option<String>,
    pub solver_order: Option<usize>,
    /// DPM-Solver: "midpoint" or "heun".
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    /// DPM-Solver: a learned-variance model output (not implemented).
    pub variance_type: Option<String>,
}

impl Default for SchedulerConfig {
    /// No keys at all: every scheduler takes its diffusers class's defaults.
    fn default() -> Self {
        SchedulerConfig {
            path: PathBuf::from("<default scheduler config>"),
            class_name: None,
            num_train_timesteps: None,
            beta_start: None,
            beta_end: None,
            beta_schedule: None,
            trained_betas: None,
            prediction_type: None,
            timestep_spacing: None,
            steps_offset: None,
            rescale_betas_zero_snr: None,
            set_alpha_to_one: None,
            clip_sample: None,
            clip_sample_range: None,
            thresholding: None,
            original_inference_steps: None,
            timestep_scaling: None,
            skip_prk_steps: None,
            interpolation_type: None,
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            use_lu_lambdas: None,
            use_flow_sigmas: None,
            use_dynamic_shifting: None,
            sigma_min: None,
            sigma_max: None,
            timestep_type: None,
            final_sigmas_type: None,
            algorithm_type: None,
            solver_order: None,
            solver_type: None,
            lower_order_final: None,
            euler_at_final: None,
            lambda_min_clipped: None,
            variance_type: None,
        }
    }
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`.
    ///
    /// Errors: [`Error::Io`] if unreadable, [`Error::Json`] if not a JSON object, and
    /// [`Error::Config`] naming the key whose value has the wrong type.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a `scheduler_config.json`; `path` is named in errors.
    ///
    /// Accepts the `NaN`, `Infinity` and `-Infinity` literals Python's json module writes
    /// (diffusers saves `lambda_min_clipped: -Infinity`).
    pub fn from_json(text: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let text = quote_non_finite_literals(text);
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(Error::Json {
                path,
                message: "expected a JSON object".into(),
            });
        };
        let f = Fields {
            map: &map,
            path: &path,
        };
        let config = SchedulerConfig {
            class_name: f.get("_class_name")?,
            num_train_timesteps: f.get("num_train_timesteps")?,
            beta_start: f.float("beta_start")?,
            beta_end: f.float("beta_end")?,
            beta_schedule: f.get("beta_schedule")?,
            trained_betas: f.get("trained_betas")?,
            prediction_type: f.get("prediction_type")?,
            timestep_spacing: f.get("timestep_spacing")?,
            steps_offset: f.get("steps_offset")?,
            rescale_betas_zero_snr: f.get("rescale_betas_zero_snr")?,
            set_alpha_to_one: f.get("set_alpha_to_one")?,
            clip_sample: f.get("clip_sample")?,
            clip_sample_range: f.float("clip_sample_range")?,
            thresholding: f.get("thresholding")?,
            original_inference_steps: f.get("original_inference_steps")?,
            timestep_scaling: f.float("timestep_scaling")?,
            skip_prk_steps: f.get("skip_prk_steps")?,
            interpolation_type: f.get("interpolation_type")?,
            use_karras_sigmas: f.get("use_karras_sigmas")?,
            use_exponential_sigmas: f.get("use_exponential_sigmas")?,
            use_beta_sigmas: f.get("use_beta_sigmas")?,
            use_lu_lambdas: f.get("use_lu_lambdas")?,
            use_flow_sigmas: f.get("use_flow_sigmas")?,
            use_dynamic_shifting: f.get("use_dynamic_shifting")?,
            sigma_min: f.float("sigma_min")?,
            sigma_max: f.float("sigma_max")?,
            timestep_type: f.get("timestep_type")?,
            final_sigmas_type: f.get("final_sigmas_type")?,
            algorithm_type: f.get("algorithm_type")?,
            solver_order: f.get("solver_order")?,
            solver_type: f.get("solver_type")?,
            lower_order_final: f.get("lower_order_final")?,
            euler_at_final: f.get("euler_at_final")?,
            lambda_min_clipped: f.float("lambda_min_clipped")?,
            variance_type: f.get("variance_type")?,
            path,
        };
        // The training schedule is built as one array of this length; SD uses 1000.
        if let Some(n) = config.num_train_timesteps {
            if n > MAX_TRAIN_TIMESTEPS {
                return Err(config.error(
                    "num_train_timesteps",
                    format!(
                        "{n} is larger than the limit of {MAX_TRAIN_TIMESTEPS} (a corrupt config?)"
                    ),
                ));
            }
        }
        Ok(config)
    }

    /// The file this config was read from (named in errors).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scheduler the model ships with (`_class_name`), for runs without `--scheduler`.
    ///
    /// `path` is the file named in errors. A class `latent` does not implement, or a
    /// `DPMSolverMultistepScheduler` set up as something other than DPM++ 2M (another
    /// `algorithm_type` or `solver_order`), is an [`Error::Config`]; the user can still pick
    /// a scheduler explicitly.
    pub fn default_kind(&self, path: impl AsRef<Path>) -> Result<SchedulerKind> {
        let path = path.as_ref();
        let Some(name) = &self.class_name else {
            return Err(Error::config(
                path,
                "_class_name",
                format!(
                    "missing: the model does not say which scheduler it uses; choose one with \
                     --scheduler ({})",
                    SchedulerKind::cli_names()
                ),
            ));
        };
        let Some(kind) = SchedulerKind::from_class_name(name) else {
            return Err(Error::config(
                path,
                "_class_name",
                format!(
                    "`{name}` is not implemented; choose another scheduler ({})",
                    SchedulerKind::cli_names()
                ),
            ));
        };
        if kind == SchedulerKind::DpmPp2m {
            if let Some(algorithm) = &self.algorithm_type {
                if algorithm != "dpmsolver++" && algorithm != "deis" {
                    return Err(Error::config(
                        path,
                        "algorithm_type",
                        format!(
                            "`{algorithm}` is not implemented (latent's DPM++ 2M is \
                             dpmsolver++ of order 2); choose another scheduler"
                        ),
                    ));
                }
            }
            if let Some(order) = self.solver_order {
                if order != 2 {
                    return Err(Error::config(
                        path,
                        "solver_order",
                        format!(
                            "{order} is not implemented (latent's DPM++ 2M is of order 2); \
                             choose another scheduler"
                        ),
                    ));
                }
            }
        }
        Ok(kind)
    }

    // Settings resolved by the schedulers, each with its class's default.

    /// An [`Error::Config`] about `field` of this file.
    pub(crate) fn error(&self, field: &str, message: impl Into<String>) -> Error {
        Error::config(&self.path, field, message)
    }

    pub(crate) fn num_train_timesteps(&self) -> Result<usize> {
        let n = self.num_train_timesteps.unwrap_or(1000);
        if n < 2 {
            return Err(self.error("num_train_timesteps", format!("{n} is too small")));
        }
        Ok(n)
    }

    /// The betas of the training schedule in float32 (diffusers' `self.betas`), rescaled to
    /// zero terminal SNR when the class has `rescale_betas_zero_snr` and the file sets it.
    /// Absent keys take the defaults most diffusers classes share ([`BetaDefaults::DDPM`]).
    pub(crate) fn betas(&self, class_has_zero_snr: bool) -> Result<Vec<f32>> {
        self.betas_with_defaults(class_has_zero_snr, BetaDefaults::DDPM)
    }

    /// [`betas`](Self::betas) for a class whose `beta_start`, `beta_end` and `beta_schedule`
    /// defaults are `defaults`.
    pub(crate) fn betas_with_defaults(
        &self,
        class_has_zero_snr: bool,
        defaults: BetaDefaults,
    ) -> Result<Vec<f32>> {
        let n = self.num_train_timesteps()?;
        let betas = if let Some(trained) = &self.trained_betas {
            if trained.len() != n {
                return Err(self.error(
                    "trained_betas",
                    format!("has {} values for {n} training timesteps", trained.len()),
                ));
            }
            trained.iter().map(|&b| b as f32).collect()
        } else {
            let start = self.beta_start.unwrap_or(defaults.start);
            let end = self.beta_end.unwrap_or(defaults.end);
            match self.beta_schedule.as_deref().unwrap_or(defaults.schedule) {
                "linear" => math::torch_linspace_f32(start, end, n),
                "scaled_linear" => math::torch_linspace_f32(start.sqrt(), end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                "squaredcos_cap_v2" => math::betas_for_alpha_bar(n),
                other => {
                    return Err(self.error(
                        "beta_schedule",
                        format!(
                            "`{other}` is not implemented (expected linear, scaled_linear or \
                             squaredcos_cap_v2)"
                        ),
                    ))
                }
            }
        };
        if let Some(bad) = betas.iter().find(|b| !(0.0..1.0).contains(*b)) {
            let field = if self.trained_betas.is_some() {
                "trained_betas"
            } else if (0.0..1.0).contains(&self.beta_start.unwrap_or(defaults.start)) {
                "beta_end"
            } else {
                "beta_start"
            };
            return Err(self.error(
                field,
                format!("gives a beta of {bad}; betas must be in [0, 1)"),
            ));
        }
        if class_has_zero_snr && self.rescale_betas_zero_snr.unwrap_or(false) {
            return Ok(math::rescale_zero_terminal_snr(&betas));
        }
        Ok(betas)
    }

    /// `prediction_type`, default epsilon; `allowed` is what the class implements.
    pub(crate) fn prediction(&self, class: &str, allowed: &[Prediction]) -> Result<Prediction> {
        let value = self.prediction_type.as_deref().unwrap_or("epsilon");
        let prediction = match value {
            "epsilon" => Some(Prediction::Epsilon),
            "v_prediction" => Some(Prediction::Velocity),
            "sample" | "original_sample" if class == "EulerDiscreteScheduler" => {
                Some(Prediction::Sample)
            }
            "sample" => Some(Prediction::Sample),
            _ => None,
        };
        match prediction {
            Some(p) if allowed.contains(&p) => Ok(p),
            _ => Err(self.error(
                "prediction_type",
                format!(
                    "`{value}` is not supported by {class} (expected {})",
                    allowed
                        .iter()
                        .map(|p| match p {
                            Prediction::Epsilon => "epsilon",
                            Prediction::Velocity => "v_prediction",
                            Prediction::Sample => "sample",
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// `timestep_spacing` with the class's default.
    pub(crate) fn spacing(&self, default: Spacing) -> Result<Spacing> {
        match self.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("linspace") => Ok(Spacing::Linspace),
            Some("leading") => Ok(Spacing::Leading),
            Some("trailing") => Ok(Spacing::Trailing),
            Some(other) => Err(self.error(
                "timestep_spacing",
                format!("`{other}` is not implemented (expected linspace, leading or trailing)"),
            )),
        }
    }

    pub(crate) fn steps_offset(&self) -> usize {
        self.steps_offset.unwrap_or(0)
    }

    /// Fails when a flag that selects an unimplemented feature is on.
    pub(crate) fn require_off(&self, value: Option<bool>, field: &str, what: &str) -> Result<()> {
        if value.unwrap_or(false) {
            return Err(self.error(field, format!("true is not supported: {what}")));
        }
        Ok(())
    }

    /// `final_sigmas_type`: true for "sigma_min", false for "zero" (the default).
    pub(crate) fn final_sigma_is_min(&self) -> Result<bool> {
        match self.final_sigmas_type.as_deref() {
            None | Some("zero") => Ok(false),
            Some("sigma_min") => Ok(true),
            Some(other) => Err(self.error(
                "final_sigmas_type",
                format!("`{other}` is not implemented (expected zero or sigma_min)"),
            )),
        }
    }
}

/// A diffusers class's defaults for the keys that make its training betas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BetaDefaults {
    pub(crate) start: f64,
    pub(crate) end: f64,
    pub(crate) schedule: &'static str,
}

impl BetaDefaults {
    /// DDPM's linear 0.0001–0.02, the defaults of DDIM, PNDM, Euler, Euler a and DPM-Solver.
    pub(crate) const DDPM: BetaDefaults = BetaDefaults {
        start: 0.0001,
        end: 0.02,
        schedule: "linear",
    };
    /// Stable Diffusion's scaled_linear 0.00085–0.012, `LCMScheduler`'s defaults.
    pub(crate) const STABLE_DIFFUSION: BetaDefaults = BetaDefaults {
        start: 0.00085,
        end: 0.012,
        schedule: "scaled_linear",
    };
}

/// Typed access to the keys of a parsed config, with errors that name the key.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| Error::config(self.path, key, format!("unexpected value {v}: {e}"))),
        }
    }

    /// A number, or one of the non-finite literals Python writes (quoted on the way in).
    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            Some(Value::String(s)) => match s.as_str() {
                "Infinity" => Ok(Some(f64::INFINITY)),
                "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
                "NaN" => Ok(Some(f64::NAN)),
                _ => Err(Error::config(
                    self.path,
                    key,
                    format!("expected a number, found \"{s}\""),
                )),
            },
            _ => self.get(key),
        }
    }
}

/// Turns the bare `NaN`, `Infinity` and `-Infinity` tokens Python's json writes into strings,
/// leaving string contents alone, so serde_json can parse the file.
fn quote_non_finite_literals(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            let literal = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|lit| rest.starts_with(lit));
            if let Some(lit) = literal {
                out.push('"');
                out.push_str(lit);
                out.push('"');
                rest = &rest[lit.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: &str = r#"{
      "_class_name": "PNDMScheduler",
      "_diffusers_version": "0.6.0",
      "beta_end": 0.012,
      "beta_schedule": "scaled_linear",
      "beta_start": 0.00085,
      "num_train_timesteps": 1000,
      "set_alpha_to_one": false,
      "skip_prk_steps": true,
      "steps_offset": 1,
      "trained_betas": null,
      "clip_sample": false
    }"#;

    #[test]
    fn reads_sd15_and_leaves_absent_keys_empty() {
        let c = SchedulerConfig::from_json(SD15, "sd15.json").unwrap();
        assert_eq!(c.class_name.as_deref(), Some("PNDMScheduler"));
        assert_eq!(c.beta_schedule.as_deref(), Some("scaled_linear"));
        assert_eq!(c.steps_offset, Some(1));
        assert_eq!(c.trained_betas, None);
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(c.prediction_type, None);
        assert_eq!(c.default_kind("sd15.json").unwrap(), SchedulerKind::Pndm);
        // Switching class: an absent key takes the target class's default.
        assert_eq!(c.spacing(Spacing::Linspace).unwrap(), Spacing::Linspace);
        assert_eq!(c.spacing(Spacing::Leading).unwrap(), Spacing::Leading);
    }

    #[test]
    fn reads_lcm_keys_and_class_beta_defaults() {
        let c = SchedulerConfig::from_json(
            r#"{"_class_name": "LCMScheduler", "original_inference_steps": 30,
                "timestep_scaling": 10.0}"#,
            "lcm.json",
        )
        .unwrap();
        assert_eq!(c.original_inference_steps, Some(30));
        assert_eq!(c.timestep_scaling, Some(10.0));
        assert_eq!(c.default_kind("lcm.json").unwrap(), SchedulerKind::Lcm);
        // Without beta keys, LCM's defaults are SD's scaled_linear, DDIM's are DDPM's linear.
        let sd = c
            .betas_with_defaults(true, BetaDefaults::STABLE_DIFFUSION)
            .unwrap();
        assert_eq!(sd[0], 0.0008499999530613422f64 as f32);
        assert_eq!(c.betas(true).unwrap()[0], 0.0001f32);
        let err = SchedulerConfig::from_json(r#"{"original_inference_steps": 4.5}"#, "l.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("l.json: field `original_inference_steps`"),
            "{err}"
        );
    }

    #[test]
    fn python_infinity_literals_parse() {
        let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                       "note": "NaN and -Infinity stay text \" here", "sigma_max": Infinity}"#;
        let c = SchedulerConfig::from_json(text, "x.json").unwrap();
        assert_eq!(c.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(c.sigma_max, Some(f64::INFINITY));
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err = SchedulerConfig::from_json(r#"{"steps_offset": "1"}"#, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cfg.json: field `steps_offset`"), "{err}");
        let err = SchedulerConfig::from_json("[1, 2]", "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a JSON object"), "{err}");
        let err = SchedulerConfig::from_json("{", "cfg.json").unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err}");
    }

    #[test]
    fn unsupported_values_name_the_file_and_field() {
        let c = SchedulerConfig::from_json(r#"{"beta_schedule": "sigmoid"}"#, "s.json").unwrap();
        let err = c.betas(true).unwrap_err().to_string();
        assert!(err.starts_with("s.json: field `beta_schedule`"), "{err}");
        let c = SchedulerConfig::from_json(r#"{"timestep_spacing": "even"}"#, "s.json").unwrap();
        assert!(c.spacing(Spacing::Leading).is_err());
        let c = SchedulerConfig::from_json(r#"{"prediction_type": "flow"}"#, "s.json").unwrap();
        let err = c
            .prediction("DDIMScheduler", &[Prediction::Epsilon])
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `prediction_type`"), "{err}");
        let c = SchedulerConfig::from_json(r#"{"trained_betas": [0.1, 0.2]}"#, "s.json").unwrap();
        let err = c.betas(false).unwrap_err().to_string();
        assert!(err.contains("2 values for 1000"), "{err}");
    }

    #[test]
    fn default_kind_rejects_what_latent_lacks() {
        let c =
            SchedulerConfig::from_json(r#"{"_class_name": "LMSDiscreteScheduler"}"#, "a").unwrap();
        let err = c.default_kind("a").unwrap_err().to_string();
        assert!(
            err.contains("`LMSDiscreteScheduler` is not implemented"),
            "{err}"
        );
        let c = SchedulerConfig::from_json(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#,
            "a",
        )
        .unwrap();
        assert!(c.default_kind("a").is_err());
        let c = SchedulerConfig::from_json(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2}"#,
            "a",
        )
        .unwrap();
        assert_eq!(c.default_kind("a").unwrap(), SchedulerKind::DpmPp2m);
        let c = SchedulerConfig::from_json("{}", "a").unwrap();
        assert!(c.default_kind("a").is_err());
    }
}
