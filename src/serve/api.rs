//! AUTOMATIC1111's API types as JSON: the answers of `/sdapi/v1/*` with its field names, and
//! the `{"detail": [...]}` of a refused request in FastAPI's (pydantic 1) form.
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

/// One reason a request was refused, as FastAPI lists it: where (`["body", "width"]`), what,
/// and the kind of problem (`type_error.integer`, `value_error.missing`, `value_error`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detail {
    pub loc: Vec<Value>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
}

impl Detail {
    /// A problem with the body field `field` (a dotted name like `override_settings.x` is one
    /// step per part).
    pub fn field(field: &str, msg: impl Into<String>, kind: &str) -> Detail {
        let mut loc = vec![Value::from("body")];
        loc.extend(field.split('.').map(Value::from));
        Detail {
            loc,
            msg: msg.into(),
            kind: kind.into(),
        }
    }

    /// A problem with the body as a whole (not JSON, not an object).
    pub fn body(msg: impl Into<String>, kind: &str) -> Detail {
        Detail {
            loc: vec![Value::from("body")],
            msg: msg.into(),
            kind: kind.into(),
        }
    }
}

/// The answer of `/sdapi/v1/txt2img`: base64 PNGs, the request as understood, and `info` (a
/// JSON object written as a string, [`Info`]).
#[derive(Debug, Clone, Serialize)]
pub struct ImagesResponse {
    pub images: Vec<String>,
    pub parameters: Map<String, Value>,
    pub info: String,
}

/// What AUTOMATIC1111's `Processed.js()` says about a run, plus what latent ignored.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub prompt: String,
    pub all_prompts: Vec<String>,
    pub negative_prompt: String,
    pub all_negative_prompts: Vec<String>,
    pub seed: u64,
    pub all_seeds: Vec<u64>,
    pub subseed: i64,
    pub all_subseeds: Vec<i64>,
    pub subseed_strength: f64,
    pub width: usize,
    pub height: usize,
    pub sampler_name: String,
    pub scheduler: String,
    pub cfg_scale: f64,
    pub steps: usize,
    pub batch_size: usize,
    pub restore_faces: bool,
    pub face_restoration_model: Option<String>,
    pub sd_model_name: String,
    pub sd_model_hash: Option<String>,
    pub sd_vae_name: Option<String>,
    pub sd_vae_hash: Option<String>,
    pub seed_resize_from_w: i64,
    pub seed_resize_from_h: i64,
    pub denoising_strength: Option<f64>,
    pub extra_generation_params: Map<String, Value>,
    pub index_of_first_image: usize,
    /// The PNG `parameters` text of each image, in order.
    pub infotexts: Vec<String>,
    pub styles: Vec<String>,
    /// `YYYYMMDDhhmmss` (UTC) of the job's start.
    pub job_timestamp: String,
    pub clip_skip: usize,
    pub is_using_inpainting_conditioning: bool,
    pub version: String,
    /// Request fields latent does not use: names AUTOMATIC1111 does not know, and known ones
    /// given a value that would change the image (`enable_hr: true`, `restore_faces: true`).
    pub ignored_fields: Vec<String>,
    /// Images abandoned by `/sdapi/v1/skip` or left by `/sdapi/v1/interrupt`.
    pub interrupted: bool,
    pub skipped_images: usize,
    /// Folder the images were saved in (`save_images`), else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_to: Option<String>,
}

/// The answer of `GET /sdapi/v1/progress`.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressResponse {
    pub progress: f64,
    pub eta_relative: f64,
    pub state: State,
    /// The newest preview of the job as a base64 PNG, when there is one.
    pub current_image: Option<String>,
    pub textinfo: Option<String>,
}

/// AUTOMATIC1111's `shared.state.dict()`, plus `queued`: requests waiting behind the job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct State {
    pub skipped: bool,
    pub interrupted: bool,
    pub stopping_generation: bool,
    pub job: String,
    /// UNet batches of the job in flight (0 when idle).
    pub job_count: usize,
    pub job_timestamp: String,
    /// Batches of the job finished so far.
    pub job_no: usize,
    pub sampling_step: usize,
    pub sampling_steps: usize,
    pub queued: usize,
}

/// One entry of `GET /sdapi/v1/samplers`.
#[derive(Debug, Clone, Serialize)]
pub struct SamplerItem {
    pub name: &'static str,
    pub aliases: Vec<&'static str>,
    pub options: BTreeMap<String, String>,
}

/// One entry of `GET /sdapi/v1/schedulers`.
#[derive(Debug, Clone, Serialize)]
pub struct SchedulerItem {
    pub name: &'static str,
    pub label: &'static str,
    pub aliases: Option<Vec<&'static str>>,
    pub default_rho: f64,
    pub need_inner_model: bool,
}

/// One entry of `GET /sdapi/v1/sd-models`.
#[derive(Debug, Clone, Serialize)]
pub struct SdModelItem {
    pub title: String,
    pub model_name: String,
    pub hash: Option<String>,
    pub sha256: Option<String>,
    pub filename: String,
    pub config: Option<String>,
}

/// One entry of `GET /sdapi/v1/sd-vae`.
#[derive(Debug, Clone, Serialize)]
pub struct SdVaeItem {
    pub model_name: String,
    pub filename: String,
}

/// One entry of `GET /sdapi/v1/embeddings`' `loaded`.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingItem {
    pub step: Option<u64>,
    pub sd_checkpoint: Option<String>,
    pub sd_checkpoint_name: Option<String>,
    /// Width of each vector.
    pub shape: usize,
    /// Number of vectors.
    pub vectors: usize,
}

/// The answer of `GET /sdapi/v1/embeddings`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EmbeddingsResponse {
    pub loaded: BTreeMap<String, EmbeddingItem>,
    pub skipped: BTreeMap<String, EmbeddingItem>,
}

/// An error answer that is not a validation failure, shaped as AUTOMATIC1111's middleware
/// answers exceptions.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorResponse {
    pub error: String,
    pub detail: String,
    pub body: String,
    pub errors: String,
}

impl ErrorResponse {
    /// An error of kind `error` (`HTTPException`, `RuntimeError`) saying `message`.
    pub fn new(error: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ErrorResponse {
            error: error.into(),
            detail: message.clone(),
            body: String::new(),
            errors: message,
        }
    }
}
