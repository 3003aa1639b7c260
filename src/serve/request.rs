//! Reading request bodies as AUTOMATIC1111's API reads them (pydantic 1 behind FastAPI): every
//! field optional with its default, `null` taken as the default, numbers given as strings
//! accepted, unknown fields ignored; each problem reported as a [`Detail`] naming its field,
//! all of them at once.
use serde_json::{Map, Value};

use super::api::Detail;
use crate::batch::parse_sampler_name;
use crate::schedulers::SchedulerKind;

/// Most denoising steps a request may ask for (AUTOMATIC1111's own API has no limit; its UI
/// stops at 150). Far beyond any use, and it keeps a typo from holding the server for days.
pub const MAX_STEPS: usize = 1000;

/// Most images one request may ask for (batch_size x n_iter): the most AUTOMATIC1111's page
/// offers (100 batches of 8). Its API has no limit, but every image of an answer is held in
/// memory until it is sent.
pub const MAX_IMAGES: usize = 800;

/// Highest clip skip accepted, as AUTOMATIC1111's setting slider.
pub const MAX_CLIP_SKIP: usize = 12;

/// A txt2img request, checked for types and ranges that need no model.
#[derive(Debug, Clone, PartialEq)]
pub struct Txt2Img {
    pub prompt: String,
    pub negative_prompt: String,
    /// `None` for -1: a random seed.
    pub seed: Option<u64>,
    /// Sampler and Karras; `None` takes the model's own scheduler.
    pub sampler: Option<(SchedulerKind, bool)>,
    pub steps: usize,
    pub cfg_scale: f64,
    /// `None` takes the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub batch_size: usize,
    pub n_iter: usize,
    /// `override_settings.sd_model_checkpoint`: the model for this request.
    pub model: Option<String>,
    /// `override_settings.CLIP_stop_at_last_layers`.
    pub clip_skip: Option<usize>,
    /// `override_settings_restore_afterwards`: false makes the overrides the new options.
    pub restore_afterwards: bool,
    pub send_images: bool,
    pub save_images: bool,
    /// Fields given that latent does not use ([`super::api::Info::ignored_fields`]).
    pub ignored: Vec<String>,
    /// AUTOMATIC1111's `parameters` echo: its fields with their defaults, then the request's.
    pub parameters: Map<String, Value>,
    /// img2img: the init picture, mask and strength; `None` for txt2img.
    pub image: Option<std::sync::Arc<crate::pipeline::ImageInput>>,
}

/// AUTOMATIC1111's txt2img fields (`StableDiffusionTxt2ImgProcessingAPI`) with their defaults.
pub(super) fn txt2img_defaults() -> Map<String, Value> {
    const DEFAULTS: &str = r#"{
        "prompt": "", "negative_prompt": "", "styles": null, "seed": -1, "subseed": -1,
        "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
        "sampler_name": null, "scheduler": null, "batch_size": 1, "n_iter": 1, "steps": 50,
        "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": null, "tiling": null,
        "do_not_save_samples": false, "do_not_save_grid": false, "eta": null,
        "denoising_strength": null, "s_min_uncond": null, "s_churn": null, "s_tmax": null,
        "s_tmin": null, "s_noise": null, "override_settings": null,
        "override_settings_restore_afterwards": true, "refiner_checkpoint": null,
        "refiner_switch_at": null, "disable_extra_networks": false, "firstpass_image": null,
        "comments": null, "enable_hr": false, "firstphase_width": 0, "firstphase_height": 0,
        "hr_scale": 2.0, "hr_upscaler": null, "hr_second_pass_steps": 0, "hr_resize_x": 0,
        "hr_resize_y": 0, "hr_checkpoint_name": null, "hr_sampler_name": null,
        "hr_scheduler": null, "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": null,
        "sampler_index": "Euler", "script_name": null, "script_args": [],
        "send_images": true, "save_images": false, "alwayson_scripts": {}, "infotext": null
    }"#;
    let v: Value = serde_json::from_str(DEFAULTS).unwrap_or_default();
    match v {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// AUTOMATIC1111's schedule types besides Automatic and Karras (`modules/sd_schedulers.py`,
/// names and labels, lower case). It takes any of them, and clients send them: SillyTavern's
/// default is "normal". latent runs the sampler's own schedule for them and reports the field;
/// a name AUTOMATIC1111 does not know either is refused, as a likely typo.
const A1111_SCHEDULES: &[&str] = &[
    "uniform",
    "exponential",
    "polyexponential",
    "sgm_uniform",
    "sgm uniform",
    "sgmuniform",
    "kl_optimal",
    "kl optimal",
    "align_your_steps",
    "align your steps",
    "simple",
    "normal",
    "ddim",
    "beta",
];

/// Fields AUTOMATIC1111 knows that change nothing here whatever their value (bookkeeping, or
/// parts of the high-resolution pass, which `enable_hr` reports).
const INERT: &[&str] = &[
    "do_not_save_samples",
    "do_not_save_grid",
    "subseed",
    "subseed_strength",
    "denoising_strength",
    "firstphase_width",
    "firstphase_height",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "force_task_id",
    "disable_extra_networks",
    "comments",
    "infotext",
    "script_args",
    "refiner_switch_at",
];

/// Whether a known field's value asks for something latent does not do (and is reported).
fn asks_for_more(name: &str, value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => match name {
            "seed_resize_from_h" | "seed_resize_from_w" => n.as_f64().is_some_and(|v| v > 0.0),
            _ => n.as_f64().is_some_and(|v| v != 0.0),
        },
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// The fields of one JSON object, taken one by one with their types checked; problems pile up
/// in `errors` with their field's name.
pub struct Fields {
    map: Map<String, Value>,
    prefix: String,
    pub errors: Vec<Detail>,
}

impl Fields {
    /// Parses `body` as a JSON object; a body that is not one is the only problem reported.
    pub fn parse(body: &[u8]) -> Result<Fields, Vec<Detail>> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            vec![Detail {
                loc: vec![Value::from("body"), Value::from(e.column())],
                msg: format!("invalid JSON: {e}"),
                kind: "value_error.jsondecode".into(),
            }]
        })?;
        match value {
            Value::Object(map) => Ok(Fields::of(map, "")),
            _ => Err(vec![Detail::body(
                "value is not a valid dict",
                "type_error.dict",
            )]),
        }
    }

    /// The fields of `map`, named `prefix.key` in errors.
    pub fn of(map: Map<String, Value>, prefix: &str) -> Fields {
        Fields {
            map,
            prefix: prefix.into(),
            errors: Vec::new(),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.into()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn fail(&mut self, key: &str, msg: impl Into<String>, kind: &str) {
        let name = self.name(key);
        self.errors.push(Detail::field(&name, msg, kind));
    }

    /// Takes `key` out of the object: `None` when absent or `null`.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    /// `defaults` with the values this object gives for their keys: AUTOMATIC1111's echo of a
    /// request in its answer's `parameters`.
    pub fn echo(&self, mut defaults: Map<String, Value>) -> Map<String, Value> {
        for (k, v) in &self.map {
            if defaults.contains_key(k) {
                defaults.insert(k.clone(), v.clone());
            }
        }
        defaults
    }

    /// Takes `key` out of the object as a raw value (`None` when absent or `null`).
    pub fn value(&mut self, key: &str) -> Option<Value> {
        self.take(key)
    }

    /// Whatever keys were not taken.
    pub fn rest(self) -> (Map<String, Value>, Vec<Detail>) {
        (self.map, self.errors)
    }

    /// A string field.
    pub fn string(&mut self, key: &str) -> Option<String> {
        match self.take(key)? {
            Value::String(s) => Some(s),
            _ => {
                self.fail(key, "str type expected", "type_error.str");
                None
            }
        }
    }

    /// A required string field.
    pub fn required_string(&mut self, key: &str) -> Option<String> {
        if self.map.get(key).is_none_or(Value::is_null) {
            self.fail(key, "field required", "value_error.missing");
            return None;
        }
        self.string(key)
    }

    /// An integer: a JSON integer, a float without fraction or a string holding an integer.
    pub fn int(&mut self, key: &str) -> Option<i128> {
        let v = self.take(key)?;
        let n = match &v {
            Value::Number(n) => n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 1e18)
                        .map(|f| f as i128)
                }),
            Value::String(s) => s.trim().parse::<i128>().ok(),
            _ => None,
        };
        if n.is_none() {
            self.fail(key, "value is not a valid integer", "type_error.integer");
        }
        n
    }

    /// An integer within `min..=max`.
    pub fn int_in(&mut self, key: &str, min: i128, max: i128) -> Option<i128> {
        let n = self.int(key)?;
        if n < min {
            self.fail(
                key,
                format!("ensure this value is greater than or equal to {min}"),
                "value_error.number.not_ge",
            );
            return None;
        }
        if n > max {
            self.fail(
                key,
                format!("ensure this value is less than or equal to {max}"),
                "value_error.number.not_le",
            );
            return None;
        }
        Some(n)
    }

    /// A size or count: an integer from 1 to `max`.
    pub fn count(&mut self, key: &str, max: usize) -> Option<usize> {
        let max = i128::try_from(max).unwrap_or(i128::MAX);
        self.int_in(key, 1, max)
            .and_then(|n| usize::try_from(n).ok())
    }

    /// A finite number (an integer or float, or a string holding one).
    pub fn float(&mut self, key: &str) -> Option<f64> {
        let v = self.take(key)?;
        let f = match &v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match f {
            Some(f) if f.is_finite() => Some(f),
            _ => {
                self.fail(key, "value is not a valid float", "type_error.float");
                None
            }
        }
    }

    /// A boolean as pydantic 1 reads one: true/false, 0/1, or a word such as "yes" or "off".
    pub fn bool(&mut self, key: &str) -> Option<bool> {
        let v = self.take(key)?;
        let b = match &v {
            Value::Bool(b) => Some(*b),
            Value::Number(n) => match n.as_i64() {
                Some(0) => Some(false),
                Some(1) => Some(true),
                _ => None,
            },
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
                "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
                _ => None,
            },
            _ => None,
        };
        if b.is_none() {
            self.fail(
                key,
                "value could not be parsed to a boolean",
                "type_error.bool",
            );
        }
        b
    }

    /// A JSON object.
    pub fn object(&mut self, key: &str) -> Option<Map<String, Value>> {
        match self.take(key)? {
            Value::Object(m) => Some(m),
            _ => {
                self.fail(key, "value is not a valid dict", "type_error.dict");
                None
            }
        }
    }

    /// A problem found by a caller's own check of `key`.
    pub fn invalid(&mut self, key: &str, msg: impl Into<String>) {
        self.fail(key, msg, "value_error");
    }
}

/// Reads a txt2img body. Errors: every field with a wrong type or range, a missing or empty
/// prompt, an unknown sampler or schedule type.
pub fn parse_txt2img(body: &[u8]) -> Result<Txt2Img, Vec<Detail>> {
    let fields = Fields::parse(body)?;
    let parameters = fields.echo(txt2img_defaults());
    parse_generation(fields, parameters)
}

/// The fields txt2img and img2img share, from `f`, with `parameters` as the echo.
pub(super) fn parse_generation(
    f: Fields,
    parameters: Map<String, Value>,
) -> Result<Txt2Img, Vec<Detail>> {
    let mut f = f;
    let prompt = f.required_string("prompt");
    let negative_prompt = f.string("negative_prompt").unwrap_or_default();
    let seed = match f.int("seed") {
        None | Some(-1) => None,
        Some(n) => match u64::try_from(n) {
            Ok(seed) => Some(seed),
            Err(_) => {
                f.invalid(
                    "seed",
                    "must be -1 (random) or a whole number from 0 to 2^64-1",
                );
                None
            }
        },
    };
    let sampler_text = f.string("sampler_name").filter(|s| !s.trim().is_empty());
    let index_text = f.string("sampler_index").filter(|s| !s.trim().is_empty());
    let (sampler_key, sampler_text) = match (sampler_text, index_text) {
        (Some(s), _) => ("sampler_name", Some(s)),
        (None, Some(s)) => ("sampler_index", Some(s)),
        (None, None) => ("sampler_name", None),
    };
    let mut sampler = None;
    if let Some(text) = sampler_text {
        match parse_sampler_name(&text) {
            Ok(found) => sampler = Some(found),
            Err(e) => f.invalid(sampler_key, e),
        }
    }
    let schedule = f.string("scheduler");
    let mut schedule_ignored = false;
    let karras = match schedule.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
        None => None,
        Some(s) if s.is_empty() || s == "automatic" => None,
        Some(s) if s == "karras" => Some(true),
        // A1111's other schedule types run as the sampler's own schedule, and are reported.
        Some(s) if A1111_SCHEDULES.contains(&s.as_str()) => {
            schedule_ignored = true;
            None
        }
        Some(_) => {
            f.invalid(
                "scheduler",
                format!(
                    "unknown schedule type `{}`; latent has Automatic (the sampler's own) and \
                     Karras",
                    schedule.as_deref().unwrap_or_default()
                ),
            );
            None
        }
    };
    let sampler = match (sampler, karras) {
        (Some((kind, k)), karras) => Some((kind, k || karras.unwrap_or(false))),
        (None, Some(_)) => {
            f.invalid(
                "scheduler",
                "Karras needs a sampler_name (Euler or DPM++ 2M)",
            );
            None
        }
        (None, None) => None,
    };
    let steps = f.count("steps", MAX_STEPS).unwrap_or(50);
    let cfg_scale = f.float("cfg_scale").unwrap_or(7.0);
    let width = f.count("width", usize::MAX);
    let height = f.count("height", usize::MAX);
    let batch_size = f.count("batch_size", MAX_IMAGES).unwrap_or(1);
    let n_iter = f.count("n_iter", MAX_IMAGES).unwrap_or(1);
    if batch_size.saturating_mul(n_iter) > MAX_IMAGES {
        f.invalid(
            "n_iter",
            format!(
                "batch_size x n_iter is {}, more than the limit of {} images per request",
                batch_size.saturating_mul(n_iter),
                MAX_IMAGES
            ),
        );
    }
    let restore_afterwards = f
        .bool("override_settings_restore_afterwards")
        .unwrap_or(true);
    let send_images = f.bool("send_images").unwrap_or(true);
    let save_images = f.bool("save_images").unwrap_or(false);
    let mut ignored = Vec::new();
    if schedule_ignored {
        ignored.push("scheduler".to_string());
    }
    let (mut model, mut clip_skip) = (None, None);
    if let Some(overrides) = f.object("override_settings") {
        let mut o = Fields::of(overrides, "override_settings");
        model = o.string("sd_model_checkpoint");
        clip_skip = o.count("CLIP_stop_at_last_layers", MAX_CLIP_SKIP);
        let (rest, errors) = o.rest();
        f.errors.extend(errors);
        ignored.extend(
            rest.keys()
                .filter(|k| !matches!(k.as_str(), "sd_vae" | "sd_model_checkpoint"))
                .map(|k| format!("override_settings.{k}")),
        );
    }
    let (rest, mut errors) = f.rest();
    for (key, value) in &rest {
        let known = parameters.contains_key(key);
        if !known || (!INERT.contains(&key.as_str()) && asks_for_more(key, value)) {
            ignored.push(key.clone());
        }
    }
    let prompt = prompt.unwrap_or_default();
    if !errors
        .iter()
        .any(|d| d.loc.get(1) == Some(&Value::from("prompt")))
    {
        if let Err(e) = crate::pipeline::check_prompts(&prompt, &negative_prompt) {
            errors.push(setting_detail(&e));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Txt2Img {
        prompt,
        negative_prompt,
        seed,
        sampler,
        steps,
        cfg_scale,
        width,
        height,
        batch_size,
        n_iter,
        model,
        clip_skip,
        restore_afterwards,
        send_images,
        save_images,
        ignored,
        parameters,
        image: None,
    })
}

/// The request field that sets a library setting.
pub fn field_of(setting: crate::Setting) -> &'static str {
    use crate::Setting;
    match setting {
        Setting::Prompt => "prompt",
        Setting::NegativePrompt => "negative_prompt",
        Setting::Width => "width",
        Setting::Height => "height",
        Setting::Steps => "steps",
        Setting::Guidance => "cfg_scale",
        Setting::Scheduler => "sampler_name",
        Setting::Karras => "scheduler",
        Setting::Seed => "seed",
        Setting::NumImages => "n_iter",
        Setting::BatchSize => "batch_size",
        Setting::ClipSkip => "override_settings.CLIP_stop_at_last_layers",
        Setting::Model => "override_settings.sd_model_checkpoint",
        Setting::InitImage => "init_images",
        Setting::Strength => "denoising_strength",
        Setting::Mask => "mask",
        _ => "",
    }
}

/// A library error as a [`Detail`]: on the request field of its setting, else on the body.
pub fn setting_detail(e: &crate::Error) -> Detail {
    match e {
        crate::Error::Setting {
            setting,
            value,
            reason,
        } => {
            let field = field_of(*setting);
            let msg = crate::error::setting_message(field, value, reason);
            if field.is_empty() {
                Detail::body(msg, "value_error")
            } else {
                Detail::field(field, msg, "value_error")
            }
        }
        other => Detail::body(other.to_string(), "value_error"),
    }
}

/// What `POST /sdapi/v1/options` asks to change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptionsUpdate {
    pub model: Option<String>,
    pub clip_skip: Option<usize>,
    /// `show_progress_every_n_steps`: 0 for no previews.
    pub preview_every: Option<usize>,
    /// Every other key, stored and shown back as given.
    pub other: Map<String, Value>,
}

/// Reads an options body; types of the options latent uses are checked.
pub fn parse_options(body: &[u8]) -> Result<OptionsUpdate, Vec<Detail>> {
    let mut f = Fields::parse(body)?;
    let model = f.string("sd_model_checkpoint");
    let clip_skip = f.count("CLIP_stop_at_last_layers", MAX_CLIP_SKIP);
    let preview_every = f
        .int_in("show_progress_every_n_steps", -1, MAX_STEPS as i128)
        .map(|n| usize::try_from(n).unwrap_or(0));
    let (other, errors) = f.rest();
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(OptionsUpdate {
        model,
        clip_skip,
        preview_every,
        other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields_of(errors: &[Detail]) -> Vec<String> {
        errors
            .iter()
            .map(|d| {
                d.loc[1..]
                    .iter()
                    .map(|v| v.as_str().map_or(v.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect()
    }

    #[test]
    fn defaults_and_coercions_follow_pydantic() {
        let r = parse_txt2img(
            br#"{"prompt": "a cat", "steps": "20", "cfg_scale": 5, "width": 64.0,
                "seed": -1, "send_images": "yes", "sampler_name": "DPM++ 2M",
                "scheduler": "Karras", "height": null, "enable_hr": false, "foo": 1,
                "restore_faces": true, "override_settings": {"CLIP_stop_at_last_layers": 2,
                "sd_vae": "Automatic", "eta_noise_seed_delta": 31337}}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, "a cat");
        assert_eq!(
            (r.steps, r.cfg_scale, r.width, r.height),
            (20, 5.0, Some(64), None)
        );
        assert_eq!(r.seed, None);
        assert_eq!(r.sampler, Some((SchedulerKind::DpmPp2m, true)));
        assert_eq!(r.clip_skip, Some(2));
        assert!(r.send_images && !r.save_images && r.restore_afterwards);
        let mut ignored = r.ignored.clone();
        ignored.sort();
        assert_eq!(
            ignored,
            [
                "foo",
                "override_settings.eta_noise_seed_delta",
                "restore_faces"
            ]
        );
        assert_eq!(r.parameters["steps"], json!("20"), "echoed as given");
        assert_eq!(r.parameters["n_iter"], json!(1), "defaults filled in");
        assert!(
            !r.parameters.contains_key("foo"),
            "unknown fields are not echoed"
        );
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let errors = parse_txt2img(
            br#"{"steps": "many", "width": -5, "cfg_scale": [1], "sampler_name": "Heun",
                "send_images": "maybe", "seed": -7, "override_settings": 3}"#,
        )
        .unwrap_err();
        let mut fields = fields_of(&errors);
        fields.sort();
        assert_eq!(
            fields,
            [
                "cfg_scale",
                "override_settings",
                "prompt",
                "sampler_name",
                "seed",
                "send_images",
                "steps",
                "width"
            ]
        );
        let missing = errors.iter().find(|d| d.kind == "value_error.missing");
        assert_eq!(missing.map(|d| d.msg.as_str()), Some("field required"));
    }

    #[test]
    fn a1111_schedule_types_latent_lacks_are_reported_not_refused() {
        for name in ["normal", "SGM Uniform", "Exponential"] {
            let body = json!({"prompt": "a cat", "sampler_name": "Euler", "scheduler": name});
            let r = parse_txt2img(body.to_string().as_bytes()).unwrap();
            assert_eq!(r.sampler, Some((SchedulerKind::Euler, false)), "{name}");
            assert_eq!(r.ignored, ["scheduler"], "{name}");
        }
        let e = parse_txt2img(br#"{"prompt": "a cat", "scheduler": "karas"}"#).unwrap_err();
        assert_eq!(fields_of(&e), ["scheduler"]);
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused() {
        let e = parse_txt2img(b"{\"prompt\": ").unwrap_err();
        assert_eq!(e[0].kind, "value_error.jsondecode");
        let e = parse_txt2img(b"[1, 2]").unwrap_err();
        assert_eq!(e[0].kind, "type_error.dict");
        let e = parse_txt2img(br#"{"prompt": "  "}"#).unwrap_err();
        assert_eq!(fields_of(&e), ["prompt"]);
    }

    #[test]
    fn options_check_the_types_they_use() {
        let u = parse_options(br#"{"sd_model_checkpoint": "m", "samples_format": "png"}"#).unwrap();
        assert_eq!(u.model.as_deref(), Some("m"));
        assert_eq!(u.other["samples_format"], json!("png"));
        let e = parse_options(br#"{"CLIP_stop_at_last_layers": 40}"#).unwrap_err();
        assert_eq!(fields_of(&e), ["CLIP_stop_at_last_layers"]);
    }
}
