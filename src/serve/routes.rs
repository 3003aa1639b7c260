//! The HTTP routes: AUTOMATIC1111's `/sdapi/v1/*` endpoints and the web page, translating each
//! request into work for the queue and its outcome into AUTOMATIC1111's answer.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::api::{
    Detail, EmbeddingItem, EmbeddingsResponse, ErrorResponse, ProgressResponse, SamplerItem,
    SchedulerItem, SdVaeItem,
};
use super::job::{JobError, JobSettings};
use super::models::Catalog;
use super::queue::{ModelInfo, Queue, Refused, Work};
use super::request::{parse_options, parse_txt2img};
use crate::schedulers::SchedulerKind;
use crate::Cancel;

/// The web page, served at `/`.
const PAGE: &str = include_str!("page.html");

/// What every handler reads.
pub struct App {
    pub queue: Queue,
    pub catalog: Catalog,
    pub start: ModelInfo,
    /// Where `save_images` requests put their folders.
    pub outputs: std::path::PathBuf,
    /// Accepted `user:password` pairs (`--api-auth`); empty: no authentication.
    pub credentials: Vec<(String, String)>,
}

type AppState = State<Arc<App>>;

/// Every route, with authentication (when configured) and a log line per request.
pub fn router(app: Arc<App>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/internal/ping", get(|| async { Json(json!({})) }))
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(skip))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/sd-vae", get(sd_vae))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route(
            "/sdapi/v1/refresh-checkpoints",
            post(|| async { Json(Value::Null) }),
        )
        .route(
            "/sdapi/v1/scripts",
            get(|| async { Json(json!({"txt2img": [], "img2img": []})) }),
        )
        .route("/sdapi/v1/upscalers", get(empty_list))
        .route("/sdapi/v1/latent-upscale-modes", get(empty_list))
        .route("/sdapi/v1/loras", get(empty_list))
        .route("/sdapi/v1/hypernetworks", get(empty_list))
        .route("/sdapi/v1/face-restorers", get(empty_list))
        .route("/sdapi/v1/prompt-styles", get(empty_list))
        .route("/sdapi/v1/realesrgan-models", get(empty_list))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            authenticate,
        ))
        .layer(axum::middleware::from_fn(move |req, next| {
            refuse_large(req, next, max_body)
        }))
        .layer(axum::middleware::from_fn(log))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(app)
}

/// 413 at once for a body whose announced length is over the limit, before reading any of it
/// (a body without a length is cut off by the limit as it is read).
async fn refuse_large(req: Request, next: Next, max_body: usize) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > max_body as u64) {
        return too_large();
    }
    next.run(req).await
}

fn too_large() -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(json!({
            "detail": "the request body is larger than the server's limit (--max-body)"
        })),
    )
        .into_response()
}

/// One line per request on stderr: method, path, status (or that the client left), time.
async fn log(req: Request, next: Next) -> Response {
    let mut line = LogLine {
        started: Instant::now(),
        request: format!("{} {}", req.method(), req.uri().path()),
        status: None,
    };
    let response = next.run(req).await;
    line.status = Some(response.status().as_u16());
    response
}

/// Printed when the request ends, answered or dropped because its client disconnected.
struct LogLine {
    started: Instant,
    request: String,
    status: Option<u16>,
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let status = self
            .status
            .map_or("- (client disconnected)".to_string(), |s| s.to_string());
        eprintln!(
            "{} {status} {:.3}s",
            self.request,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// HTTP Basic authentication against `--api-auth`, as AUTOMATIC1111 does for its API.
async fn authenticate(State(app): AppState, req: Request, next: Next) -> Response {
    if app.credentials.is_empty() || authorized(req.headers(), &app.credentials) {
        return next.run(req).await;
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        Json(json!({"detail": "Incorrect username or password"})),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"latent\""),
    );
    response
}

fn authorized(headers: &HeaderMap, credentials: &[(String, String)]) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        })
    else {
        return false;
    };
    let mut ok = false;
    for (user, password) in credentials {
        let expected = format!("{user}:{password}");
        ok |= same_bytes(expected.as_bytes(), &given);
    }
    ok
}

/// Compares without stopping at the first difference, so the time taken tells nothing.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response()
}

async fn empty_list() -> Json<Value> {
    Json(json!([]))
}

/// 422 with FastAPI's `{"detail": [...]}`.
fn unprocessable(details: Vec<Detail>) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({ "detail": details })),
    )
        .into_response()
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (status, Json(ErrorResponse::new(kind, message))).into_response()
}

/// A body that could not be read: too large (413), or cut off.
fn rejected(r: BytesRejection) -> Response {
    let status = r.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return too_large();
    }
    (status, Json(json!({ "detail": r.body_text() }))).into_response()
}

fn refused(r: Refused) -> Response {
    let (message, retry) = match r {
        Refused::Full { capacity } => (
            format!("the queue is full ({capacity} requests waiting); try again later"),
            true,
        ),
        Refused::Stopping => ("the server is shutting down".to_string(), false),
    };
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "HTTPException", message);
    if retry {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

fn job_error(e: JobError) -> Response {
    match e {
        JobError::Invalid(details) => unprocessable(details),
        JobError::Failed(message) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "RuntimeError", message)
        }
        JobError::Unavailable(message) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "HTTPException", message)
        }
    }
}

/// Interrupts a job when the request waiting for it is dropped (its client disconnected).
struct CancelOnDrop(Option<Cancel>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.interrupt();
        }
    }
}

/// Queues `work` and waits for its answer; the job is interrupted if this future is dropped.
async fn queue_and_wait<T>(
    app: &App,
    make: impl FnOnce(oneshot::Sender<Result<T, JobError>>) -> Work,
) -> Result<T, Response> {
    let cancel = Cancel::new();
    let (tx, rx) = oneshot::channel();
    app.queue
        .submit(make(tx), cancel.clone())
        .map_err(refused)?;
    let mut guard = CancelOnDrop(Some(cancel));
    let answer = rx.await;
    guard.0 = None;
    match answer {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(job_error(e)),
        Err(_) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "RuntimeError",
            "the job failed inside the server (see its log)",
        )),
    }
}

async fn txt2img(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return rejected(r),
    };
    let mut req = match parse_txt2img(&body) {
        Ok(r) => r,
        Err(details) => return unprocessable(details),
    };
    let (model, settings) = {
        let mut options = app.queue.shared().options();
        let name = req.model.clone().unwrap_or_else(|| options.model.clone());
        let Some(model) = app.catalog.find(&name).cloned() else {
            drop(options);
            return unprocessable(vec![Detail::field(
                "override_settings.sd_model_checkpoint",
                format!("model `{name}` not found; GET /sdapi/v1/sd-models lists them"),
                "value_error",
            )]);
        };
        let clip_skip = req.clip_skip.unwrap_or(options.clip_skip);
        if !req.restore_afterwards {
            options.model = model.title.clone();
            options.clip_skip = clip_skip;
        }
        let settings = JobSettings {
            clip_skip,
            preview_every: options.preview_every,
            outputs: app.outputs.clone(),
        };
        (model, settings)
    };
    let seed = req.seed.unwrap_or_else(random_seed);
    req.model = None;
    let result = queue_and_wait(&app, |reply| Work::Txt2Img {
        request: Box::new(req),
        model,
        seed,
        settings,
        reply,
    })
    .await;
    match result {
        Ok(answer) => Json(answer).into_response(),
        Err(response) => response,
    }
}

async fn img2img(body: Result<Bytes, BytesRejection>) -> Response {
    if let Err(r) = body {
        return rejected(r);
    }
    error(
        StatusCode::NOT_IMPLEMENTED,
        "HTTPException",
        "img2img is not available in this version of latent: only /sdapi/v1/txt2img generates",
    )
}

async fn get_options(State(app): AppState) -> Json<Value> {
    let o = app.queue.shared().options().clone();
    let mut map = o.other;
    map.insert("sd_model_checkpoint".into(), Value::from(o.model));
    map.insert("CLIP_stop_at_last_layers".into(), Value::from(o.clip_skip));
    map.insert(
        "show_progress_every_n_steps".into(),
        Value::from(o.preview_every),
    );
    map.entry("sd_vae").or_insert_with(|| {
        Value::from(app.start.vae.clone().unwrap_or_else(|| "Automatic".into()))
    });
    map.entry("samples_format").or_insert_with(|| "png".into());
    map.entry("live_previews_enable")
        .or_insert(Value::Bool(true));
    Json(Value::Object(map))
}

async fn set_options(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return rejected(r),
    };
    let update = match parse_options(&body) {
        Ok(u) => u,
        Err(details) => return unprocessable(details),
    };
    let model = match &update.model {
        Some(name) => match app.catalog.find(name) {
            Some(entry) => Some(entry.clone()),
            None => {
                return unprocessable(vec![Detail::field(
                    "sd_model_checkpoint",
                    format!("model `{name}` not found; GET /sdapi/v1/sd-models lists them"),
                    "value_error",
                )])
            }
        },
        None => None,
    };
    {
        let mut o = app.queue.shared().options();
        if let Some(c) = update.clip_skip {
            o.clip_skip = c;
        }
        if let Some(p) = update.preview_every {
            o.preview_every = p;
        }
        o.other.extend(update.other);
    }
    if let Some(model) = model {
        // AUTOMATIC1111 answers once the model is loaded; so does this, through the queue.
        let title = model.title.clone();
        let loaded = queue_and_wait(&app, |reply| Work::Load { model, reply }).await;
        if let Err(response) = loaded {
            return response;
        }
        app.queue.shared().options().model = title;
    }
    Json(Value::Null).into_response()
}

#[derive(serde::Deserialize)]
struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

async fn progress(
    State(app): AppState,
    query: Result<Query<ProgressQuery>, QueryRejection>,
) -> Json<ProgressResponse> {
    let skip_image = query.is_ok_and(|q| q.skip_current_image);
    let shared = app.queue.shared();
    let (mut state, started, preview) = {
        let p = shared.progress();
        let preview = if skip_image { None } else { p.preview.clone() };
        (p.state.clone(), p.started, preview)
    };
    state.queued = shared.queued();
    // AUTOMATIC1111's estimate: 1% for starting, then batches and steps done.
    let (progress, eta) = if state.job_count == 0 {
        (0.0, 0.0)
    } else {
        let batches = state.job_count as f64;
        let mut p = 0.01 + state.job_no as f64 / batches;
        if state.sampling_steps > 0 {
            p += state.sampling_step as f64 / state.sampling_steps as f64 / batches;
        }
        let elapsed = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        (p.min(1.0), elapsed / p - elapsed)
    };
    let current_image = preview.and_then(|img| {
        crate::output::encode_rgb(&img.rgb, img.width as u32, img.height as u32, "")
            .ok()
            .map(|png| base64::engine::general_purpose::STANDARD.encode(png))
    });
    Json(ProgressResponse {
        progress,
        eta_relative: eta,
        state,
        current_image,
        textinfo: None,
    })
}

async fn interrupt(State(app): AppState) -> Json<Value> {
    app.queue.shared().interrupt();
    Json(json!({}))
}

async fn skip(State(app): AppState) -> Json<Value> {
    app.queue.shared().skip();
    Json(Value::Null)
}

async fn sd_models(State(app): AppState) -> Json<Vec<super::api::SdModelItem>> {
    Json(app.catalog.entries().iter().map(|e| e.item()).collect())
}

async fn samplers() -> Json<Vec<SamplerItem>> {
    let aliases = |k: SchedulerKind| match k {
        SchedulerKind::EulerAncestral => vec!["k_euler_a", "k_euler_ancestral"],
        SchedulerKind::Euler => vec!["k_euler"],
        SchedulerKind::DpmPp2m => vec!["k_dpmpp_2m"],
        SchedulerKind::Pndm => vec!["pndm"],
        SchedulerKind::Ddim | SchedulerKind::Lcm => vec![],
    };
    Json(
        SchedulerKind::ALL
            .iter()
            .map(|&k| SamplerItem {
                name: k.a1111_name(),
                aliases: aliases(k),
                options: BTreeMap::new(),
            })
            .collect(),
    )
}

async fn schedulers() -> Json<Vec<SchedulerItem>> {
    Json(vec![
        SchedulerItem {
            name: "automatic",
            label: "Automatic",
            aliases: None,
            default_rho: -1.0,
            need_inner_model: false,
        },
        SchedulerItem {
            name: "karras",
            label: "Karras",
            aliases: None,
            default_rho: 7.0,
            need_inner_model: false,
        },
    ])
}

async fn sd_vae(State(app): AppState) -> Json<Vec<SdVaeItem>> {
    Json(
        app.start
            .vae
            .iter()
            .map(|name| SdVaeItem {
                model_name: name.clone(),
                filename: name.clone(),
            })
            .collect(),
    )
}

async fn embeddings(State(app): AppState) -> Json<EmbeddingsResponse> {
    let loaded = app
        .start
        .embeddings
        .iter()
        .map(|(name, shape, vectors)| {
            (
                name.clone(),
                EmbeddingItem {
                    step: None,
                    sd_checkpoint: None,
                    sd_checkpoint_name: None,
                    shape: *shape,
                    vectors: *vectors,
                },
            )
        })
        .collect();
    Json(EmbeddingsResponse {
        loaded,
        skipped: BTreeMap::new(),
    })
}

/// A random seed in AUTOMATIC1111's range (32 bits), for `seed: -1`.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() & 0xFFFF_FFFF
}
