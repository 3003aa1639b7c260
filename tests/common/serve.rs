//! A running `latent serve` for the tests that speak HTTP to it (tests/serve.rs,
//! tests/serve_clients.rs), and helpers to read its answers.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use super::fixtures;

/// A running `latent serve` and everything it printed on stderr.
pub struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
    /// `Authorization` header sent with every request of these helpers, when set.
    auth: Option<String>,
}

impl Server {
    /// Starts `latent serve --listen 127.0.0.1:0 ARGS` in `dir` and waits for its address.
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_latent"))
            .current_dir(dir)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("LATENT_MODEL")
            .env_remove("LATENT_API_AUTH")
            .env("LATENT_CACHE_DIR", dir.join("cache"))
            .env("HF_HUB_OFFLINE", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start latent serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stream = child.stderr.take().unwrap();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let address = rest.split('/').next().unwrap_or_default().to_string();
                    let _ = tx.send(address);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let address = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("server did not start: {:?}", log.lock().unwrap()));
        Server {
            child,
            base: format!("http://{address}"),
            log,
            auth: None,
        }
    }

    /// Sends `header` as `Authorization` with every request of these helpers from now on.
    pub fn set_auth(&mut self, header: &str) {
        self.auth = Some(header.to_string());
    }

    /// `request` with this server's `Authorization` header, when one is set.
    pub fn with_auth(&self, request: ureq::Request) -> ureq::Request {
        match &self.auth {
            Some(header) => request.set("Authorization", header),
            None => request,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn address(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// GET `path`: (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        reply(self.with_auth(ureq::get(&self.url(path))).call())
    }

    /// POST `body` (any text) to `path`: (status, JSON body).
    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        reply(
            self.with_auth(ureq::post(&self.url(path)))
                .set("Content-Type", "application/json")
                .send_string(body),
        )
    }

    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post(path, &body.to_string())
    }

    /// Polls `/progress` until `done` holds (or fails after `secs`).
    pub fn wait_progress(&self, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let (status, p) = self.get("/sdapi/v1/progress");
            assert_eq!(status, 200);
            if done(&p) {
                return p;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "progress never got there: {p}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit.
    #[cfg(unix)]
    pub fn interrupt_and_wait(&mut self, secs: u64) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by its id.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "the server did not stop after Ctrl-C: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn reply(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let response = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

pub fn model(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

pub fn b64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64 image")
}

/// The `info` string of an answer, parsed.
pub fn info(answer: &Value) -> Value {
    serde_json::from_str(answer["info"].as_str().expect("info is a string")).unwrap()
}

/// Pixels and `parameters` text of a PNG.
pub fn png(bytes: &[u8]) -> (Vec<u8>, String) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    buf.truncate(frame.buffer_size());
    let text = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .unwrap_or_default();
    (buf, text)
}

/// A request that keeps the worker busy for a long while (until interrupted).
pub fn long_request() -> Value {
    json!({"prompt": "a red square", "steps": 1000, "n_iter": 50, "seed": 3, "sampler_name": "Euler"})
}

/// Starts `body` in a thread; its answer comes back through the handle.
pub fn in_background(server: &Server, body: Value) -> std::thread::JoinHandle<(u16, Value)> {
    let url = server.url("/sdapi/v1/txt2img");
    std::thread::spawn(move || {
        reply(
            ureq::post(&url)
                .set("Content-Type", "application/json")
                .send_string(&body.to_string()),
        )
    })
}

/// A fixture picture as base64.
pub fn fixture_b64(name: &str) -> String {
    let bytes = std::fs::read(fixtures().join("img2img").join(name)).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
