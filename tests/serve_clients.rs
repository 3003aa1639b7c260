//! `latent serve` driven by the call sequences of two AUTOMATIC1111 clients nobody here wrote,
//! scripted as their sources send them (endpoints, methods, headers, body fields) and checked
//! on what each one reads back:
//! - Open WebUI's image generation with the automatic1111 engine (its backend router
//!   `backend/open_webui/routers/images.py`, main branch of 2025);
//! - SillyTavern's Stable Diffusion extension with the AUTOMATIC1111 source (release 1.12.6:
//!   the page `public/scripts/extensions/stable-diffusion/index.js` and the server proxy
//!   `src/endpoints/stable-diffusion.js`).
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Map, Value};

mod common;
use common::fixtures;
use common::serve::{model, png, reply, Server};

fn basic(user_pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    )
}

/// A server on tiny-sd1 that may switch to any of the tiny fixture models.
fn server_with_models(dir: &std::path::Path, extra: &[&str]) -> Server {
    let all = fixtures().display().to_string();
    let sd1 = model("tiny-sd1");
    let mut args = vec!["--model", sd1.as_str(), "--models-dir", all.as_str()];
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

/// Open WebUI's automatic1111 engine. Every request carries an `authorization` header: Basic
/// with the configured `user:password`, or an empty value when none is configured.
struct OpenWebUi<'a> {
    server: &'a Server,
    authorization: String,
}

impl OpenWebUi<'_> {
    fn get(&self, path: &str) -> (u16, Value) {
        reply(
            ureq::get(&self.server.url(path))
                .set("authorization", &self.authorization)
                .call(),
        )
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        reply(
            ureq::post(&self.server.url(path))
                .set("authorization", &self.authorization)
                .send_json(body.clone()),
        )
    }

    /// The admin's "verify connection": GET options, any error status fails.
    fn verify_url(&self) -> bool {
        self.get("/sdapi/v1/options").0 == 200
    }

    /// `get_image_model`: options' `sd_model_checkpoint`.
    fn image_model(&self) -> String {
        let (status, options) = self.get("/sdapi/v1/options");
        assert_eq!(status, 200, "{options}");
        options["sd_model_checkpoint"]
            .as_str()
            .expect("sd_model_checkpoint is a string")
            .to_string()
    }

    /// `get_models`: each model's `title` as its id and `model_name` as its name.
    fn models(&self) -> Vec<(String, String)> {
        let (status, models) = self.get("/sdapi/v1/sd-models");
        assert_eq!(status, 200, "{models}");
        models
            .as_array()
            .expect("a list")
            .iter()
            .map(|m| {
                (
                    m["title"].as_str().unwrap().to_string(),
                    m["model_name"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// `set_image_model`: GET options, and when the model differs, POST the whole options
    /// object back with `sd_model_checkpoint` changed (failing on an error status).
    fn set_image_model(&self, model: &str) {
        let (status, mut options) = self.get("/sdapi/v1/options");
        assert_eq!(status, 200, "{options}");
        if options["sd_model_checkpoint"] != json!(model) {
            options["sd_model_checkpoint"] = json!(model);
            let (status, answer) = self.post("/sdapi/v1/options", &options);
            assert_eq!(status, 200, "POST options: {answer}");
        }
    }

    /// `image_generations` for an admin: the model set first, then txt2img with
    /// `{prompt, batch_size: n, width, height}`, `steps` and `negative_prompt` when given, and
    /// the admin's AUTOMATIC1111 parameters on top. Reads every entry of `images` (base64,
    /// a `data:` prefix split off when there is one) and `info`, which it stores as the image's
    /// metadata (older releases `json.loads` it).
    fn generate(&self, model: &str, prompt: &str, size: &str, n: usize, params: &Value) -> Made {
        self.set_image_model(model);
        let (width, height) = size.split_once('x').unwrap();
        let mut data = json!({
            "prompt": prompt,
            "batch_size": n,
            "width": width.parse::<u32>().unwrap(),
            "height": height.parse::<u32>().unwrap(),
            "steps": 3,
            "negative_prompt": "blurry",
        });
        for (k, v) in params.as_object().unwrap() {
            data[k] = v.clone();
        }
        let (status, res) = self.post("/sdapi/v1/txt2img", &data);
        assert_eq!(status, 200, "{res}");
        let images = res["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|image| {
                let text = image.as_str().unwrap();
                let encoded = text.split_once(',').map_or(text, |(_, e)| e);
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .expect("base64")
            })
            .collect();
        let info: Value =
            serde_json::from_str(res["info"].as_str().expect("info is a string")).unwrap();
        Made { images, info }
    }
}

/// What a client got back from txt2img: the PNG files and the decoded `info`.
struct Made {
    images: Vec<Vec<u8>>,
    info: Value,
}

#[test]
fn open_webui_lists_switches_and_generates_with_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_models(dir.path(), &["--api-auth", "owui:pw"]);
    let wrong = OpenWebUi {
        server: &server,
        authorization: basic("owui:nope"),
    };
    assert!(!wrong.verify_url(), "wrong credentials fail verification");
    let client = OpenWebUi {
        server: &server,
        authorization: basic("owui:pw"),
    };
    assert!(client.verify_url());
    assert_eq!(client.image_model(), "tiny-sd1");
    let models = client.models();
    assert!(
        models.contains(&("tiny-sd2".to_string(), "tiny-sd2".to_string())),
        "{models:?}"
    );

    // The admin saves the settings with another model: the whole options object goes back.
    client.set_image_model("tiny-sd2");
    assert_eq!(client.image_model(), "tiny-sd2");

    let params = json!({"cfg_scale": 6.5, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                        "seed": 42});
    let made = client.generate("tiny-sd2", "a lighthouse at dusk", "64x48", 2, &params);
    assert_eq!(made.images.len(), 2);
    for bytes in &made.images {
        let (pixels, text) = png(bytes);
        assert_eq!(pixels.len(), 64 * 48 * 3);
        assert!(text.starts_with("a lighthouse at dusk"), "{text}");
    }
    let info = &made.info;
    assert_eq!(info["sd_model_name"], "tiny-sd2");
    assert_eq!(info["all_seeds"], json!([42, 43]));
    assert_eq!(info["sampler_name"], "DPM++ 2M");
    assert_eq!(info["scheduler"], "Karras");
    assert_eq!(info["negative_prompt"], "blurry");
    assert_eq!(info["infotexts"].as_array().unwrap().len(), 2);
    assert_eq!(
        info["ignored_fields"],
        json!([]),
        "nothing it sends is ignored"
    );
}

#[test]
fn open_webui_without_credentials_sends_an_empty_authorization() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_models(dir.path(), &[]);
    let client = OpenWebUi {
        server: &server,
        authorization: String::new(),
    };
    assert!(client.verify_url());
    let current = client.image_model();
    // The same model: no POST of the options.
    let made = client.generate(&current, "a red apple", "64x64", 1, &json!({}));
    assert_eq!(made.images.len(), 1);
    assert_eq!(made.info["sd_model_name"], "tiny-sd1");
    assert_eq!(made.info["all_seeds"].as_array().unwrap().len(), 1);
}

/// SillyTavern with the AUTOMATIC1111 source: its server proxies each call with
/// `Authorization: Basic base64(auth)`, `auth` being the user's `user:password` or empty.
struct SillyTavern<'a> {
    server: &'a Server,
    auth: String,
}

impl SillyTavern<'_> {
    fn authorization(&self) -> String {
        basic(&self.auth)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        reply(
            ureq::get(&self.server.url(path))
                .set("Authorization", &self.authorization())
                .call(),
        )
    }

    /// A GET that fails on an error status ("SD WebUI returned an error.").
    fn get_ok(&self, path: &str) -> Value {
        let (status, value) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {value}");
        value
    }

    fn names(&self, path: &str, key: &str) -> Vec<String> {
        self.get_ok(path)
            .as_array()
            .expect("a list")
            .iter()
            .map(|x| x[key].as_str().unwrap().to_string())
            .collect()
    }

    /// `/ping`: GET options.
    fn ping(&self) -> bool {
        self.get("/sdapi/v1/options").0 == 200
    }

    /// `/upscalers`: upscaler names with the latent upscale modes spliced in after the first.
    fn upscalers(&self) -> Vec<String> {
        let mut names = self.names("/sdapi/v1/upscalers", "name");
        let latent = self.names("/sdapi/v1/latent-upscale-modes", "name");
        let at = names.len().min(1);
        names.splice(at..at, latent);
        names
    }

    /// `/vaes`: sd-vae (AUTOMATIC1111) or sd-modules (Forge), the first that answers a list.
    fn vaes(&self) -> Vec<String> {
        for path in ["/sdapi/v1/sd-vae", "/sdapi/v1/sd-modules"] {
            if let (200, Value::Array(list)) = self.get(path) {
                return list
                    .iter()
                    .map(|x| x["model_name"].as_str().unwrap().to_string())
                    .collect();
            }
        }
        panic!("no VAE list");
    }

    /// `/models`: the titles.
    fn models(&self) -> Vec<String> {
        self.names("/sdapi/v1/sd-models", "title")
    }

    /// `/get-model`: options' `sd_model_checkpoint`.
    fn get_model(&self) -> String {
        self.get_ok("/sdapi/v1/options")["sd_model_checkpoint"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// `/set-model`: POST `{sd_model_checkpoint}` to options, then poll progress until
    /// `progress == 0 && state.job_count == 0`, at most 10 times (every 2 s there; 50 ms here).
    /// Returns the polls it took.
    fn set_model(&self, model: &str) -> usize {
        let (status, answer) = reply(
            ureq::post(&self.server.url("/sdapi/v1/options"))
                .set("Content-Type", "application/json")
                .set("Authorization", &self.authorization())
                .send_string(&json!({ "sd_model_checkpoint": model }).to_string()),
        );
        assert_eq!(status, 200, "{answer}");
        for attempt in 1..=10 {
            let p = self.get_ok("/sdapi/v1/progress");
            if p["progress"].as_f64() == Some(0.0) && p["state"]["job_count"] == json!(0) {
                return attempt;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server never went idle after the model switch");
    }

    /// The body of `generateAutoImage`, as the page sends it to its server, which forwards it
    /// whole (`url` and `auth` included) to txt2img.
    fn body(&self, prompt: &str, sampler: &str, scheduler: &str, steps: u32, seed: i64) -> Value {
        let mut body = json!({
            "url": self.server.url(""),
            "auth": self.auth,
            "prompt": prompt,
            "negative_prompt": "lowres, bad anatomy",
            "sampler_name": sampler,
            "scheduler": scheduler,
            "steps": steps,
            "cfg_scale": 7,
            "width": 64,
            "height": 64,
            "restore_faces": false,
            "enable_hr": false,
            "hr_upscaler": "Latent",
            "hr_scale": 2.0,
            "denoising_strength": 0.7,
            "hr_second_pass_steps": 0,
            "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": true,
            "clip_skip": 1,
            "save_images": true,
            "send_images": true,
            "do_not_save_grid": false,
            "do_not_save_samples": false,
        });
        // A seed below 0 ("random") is left out.
        if seed >= 0 {
            body["seed"] = json!(seed);
        }
        body
    }

    /// `/generate`: POST the body to txt2img and hand back the answer, of which the page reads
    /// `images[0]` as a PNG.
    fn generate(&self, body: &Value) -> Value {
        // Releases after 1.12.6 first GET options to tell Forge apart (by its `forge_preset`
        // key) and drop Forge-only overrides otherwise.
        assert!(!self
            .get_ok("/sdapi/v1/options")
            .as_object()
            .unwrap()
            .contains_key("forge_preset"));
        let (status, data) = reply(
            ureq::post(&self.server.url("/sdapi/v1/txt2img"))
                .set("Content-Type", "application/json")
                .set("Authorization", &self.authorization())
                .send_string(&body.to_string()),
        );
        assert_eq!(status, 200, "{data}");
        data
    }

    /// `/generate` sent, without waiting for its answer.
    fn start_generate(&self, body: &Value) -> TcpStream {
        let mut raw = TcpStream::connect(self.server.address()).unwrap();
        let body = body.to_string();
        write!(
            raw,
            "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Authorization: {}\r\nContent-Length: {}\r\n\r\n{body}",
            self.authorization(),
            body.len()
        )
        .unwrap();
        raw
    }

    /// The user's abort: the page's request to its server closes, and the server, its answer
    /// not yet written, POSTs interrupt (no body) and aborts its txt2img request.
    fn abort(&self, txt2img: TcpStream) {
        let (status, _) = reply(
            ureq::post(&self.server.url("/sdapi/v1/interrupt"))
                .set("Authorization", &self.authorization())
                .call(),
        );
        assert_eq!(status, 200);
        drop(txt2img);
    }
}

/// `images[0]` of a txt2img answer as the page reads it: a base64 PNG.
fn first_image(data: &Value) -> (Vec<u8>, String) {
    let text = data["images"][0].as_str().expect("images[0]");
    png(&base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64"))
}

fn info(data: &Value) -> Map<String, Value> {
    serde_json::from_str(data["info"].as_str().unwrap()).unwrap()
}

#[test]
fn sillytavern_loads_lists_switches_generates_and_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_models(dir.path(), &[]);
    let st = SillyTavern {
        server: &server,
        auth: String::new(),
    };
    // Connecting: ping, then the lists of the settings page.
    assert!(st.ping());
    let samplers = st.names("/sdapi/v1/samplers", "name");
    let schedulers = st.names("/sdapi/v1/schedulers", "name");
    assert!(samplers.contains(&"DPM++ 2M".to_string()), "{samplers:?}");
    assert_eq!(schedulers, ["automatic", "karras"]);
    assert_eq!(st.upscalers(), Vec::<String>::new());
    assert_eq!(st.vaes(), Vec::<String>::new());
    let models = st.models();
    assert!(models.contains(&"tiny-sd2".to_string()), "{models:?}");
    assert_eq!(st.get_model(), "tiny-sd1");

    // The user picks another model.
    let polls = st.set_model("tiny-sd2");
    assert_eq!(polls, 1, "idle as soon as the switch is answered");
    assert_eq!(st.get_model(), "tiny-sd2");

    // /imagine: the sampler and schedule type chosen from the lists.
    let body = st.body("a castle on a hill", "DPM++ 2M", "karras", 4, 5);
    let data = st.generate(&body);
    let (pixels, text) = first_image(&data);
    assert_eq!(pixels.len(), 64 * 64 * 3);
    assert!(text.contains("Schedule type: Karras"), "{text}");
    let i = info(&data);
    assert_eq!(i["sd_model_name"], "tiny-sd2");
    assert_eq!(i["all_seeds"], json!([5]));
    assert_eq!(
        i["ignored_fields"],
        json!(["auth", "clip_skip", "url"]),
        "only what AUTOMATIC1111 does not know either"
    );
    // Relative to the server's working folder.
    let saved = dir
        .path()
        .join(i["saved_to"].as_str().expect("save_images saves"));
    assert!(saved.is_dir(), "{}", saved.display());

    // SillyTavern's own default schedule type, "normal", and a random seed.
    let data = st.generate(&st.body("a castle on a hill", "Euler a", "normal", 3, -1));
    assert_eq!(first_image(&data).0.len(), 64 * 64 * 3);
    assert_eq!(
        info(&data)["ignored_fields"],
        json!(["auth", "clip_skip", "scheduler", "url"])
    );

    // The user aborts a long generation.
    // (More steps than SillyTavern's slider offers, and batches, so it is still running.)
    let mut long = st.body("a castle on a hill", "Euler", "automatic", 1000, 9);
    long["n_iter"] = json!(50);
    let mut txt2img = st.start_generate(&long);
    server.wait_progress(60, |p| {
        p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0
    });
    txt2img
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let mut nothing = [0u8; 1];
    assert!(
        txt2img.read(&mut nothing).is_err(),
        "no answer before the abort"
    );
    st.abort(txt2img);
    server.wait_progress(20, |p| p["state"]["job_count"] == json!(0));
    // And the next picture comes as before: the first one again.
    assert!(st.ping());
    let data = st.generate(&body);
    assert!(
        first_image(&data).0 == pixels,
        "the same picture as before the abort"
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
}
