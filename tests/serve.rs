//! `latent serve` end to end: the real binary on a free port, spoken to over HTTP as
//! AUTOMATIC1111's clients speak: txt2img equal to `latent generate`, saving with a manifest,
//! model switches through options, progress with previews, interrupt, a client that leaves,
//! Ctrl-C, and every kind of bad request answered with its status while the server goes on.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

mod common;
use common::serve::{
    b64, fixture_b64, in_background, info, long_request, model, png, reply, Server,
};
use common::{fixtures, stderr};

#[test]
fn txt2img_answers_what_generate_makes_and_saves_with_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let request = json!({
        "prompt": "a red circle on a blue background",
        "negative_prompt": "green",
        "seed": 7,
        "steps": 6,
        "cfg_scale": 5,
        "sampler_name": "Euler a",
        "restore_faces": false,
        "made_up_field": 1,
    });
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &request);
    assert_eq!(status, 200, "{answer}");
    let images = answer["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let (pixels, text) = png(&b64(images[0].as_str().unwrap()));
    let i = info(&answer);
    assert_eq!(i["all_seeds"], json!([7]));
    assert_eq!(i["infotexts"][0].as_str().unwrap(), text);
    assert_eq!(i["ignored_fields"], json!(["made_up_field"]));
    assert_eq!(answer["parameters"]["seed"], json!(7));
    assert_eq!(answer["parameters"]["sampler_name"], json!("Euler a"));

    let out = dir.path().join("alone.png");
    let generated = Command::new(env!("CARGO_BIN_EXE_latent"))
        .current_dir(dir.path())
        .env("LATENT_CACHE_DIR", dir.path().join("cache"))
        .env_remove("LATENT_MODEL")
        .args(["generate", "a red circle on a blue background", "--quiet"])
        .args(["--negative-prompt", "green", "--seed", "7", "--steps", "6"])
        .args(["--guidance", "5", "--scheduler", "euler-a", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(generated.status.success(), "{}", stderr(&generated));
    let (alone, alone_text) = png(&std::fs::read(&out).unwrap());
    assert_eq!(text, alone_text, "the same parameters text");
    assert!(
        pixels == alone,
        "the server's image equals latent generate's, pixel for pixel"
    );

    // A1111's counts: n_iter batches of batch_size images, seeds counting up; saved as a batch.
    let mut request = request.clone();
    request["batch_size"] = json!(2);
    request["n_iter"] = json!(2);
    request["save_images"] = json!(true);
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &request);
    assert_eq!(status, 200, "{answer}");
    let i = info(&answer);
    assert_eq!(i["all_seeds"], json!([7, 8, 9, 10]));
    let images: Vec<Vec<u8>> = answer["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| b64(v.as_str().unwrap()))
        .collect();
    assert_eq!(images.len(), 4);
    let worst = png(&images[0])
        .0
        .iter()
        .zip(&pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .max();
    // As `latent batch`: a batch of 2 differs from one image only in float summation order,
    // which may flip a pixel by one level.
    assert!(worst <= Some(1), "seed 7 again in a batch of 2: {worst:?}");
    let folder = PathBuf::from(i["saved_to"].as_str().unwrap());
    let folder = dir.path().join(folder);
    let manifest = std::fs::read_to_string(folder.join("manifest.jsonl")).unwrap();
    let records: Vec<Value> = manifest
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 4);
    for (record, image) in records.iter().zip(&images) {
        let file = std::fs::read(folder.join(record["file"].as_str().unwrap())).unwrap();
        assert!(&file == image, "the saved file is the answered one");
    }
    assert_eq!(records[3]["seed"], json!(10));
    assert_eq!(records[3]["batch_size"], json!(2));

    // send_images false: no images, the info still says what was made.
    let (status, answer) = server.post_json(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a cat", "steps": 2, "send_images": false}),
    );
    assert_eq!(status, 200);
    assert_eq!(answer["images"], json!([]));
    assert_eq!(info(&answer)["infotexts"].as_array().unwrap().len(), 1);
    let log = server.log();
    assert!(
        log.lines()
            .filter(|l| l.starts_with("POST /sdapi/v1/txt2img 200"))
            .count()
            == 3,
        "one log line per request: {log}"
    );
}

#[test]
fn options_switch_among_the_models_dir() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = model("tiny-sd1");
    let all = fixtures().display().to_string();
    let server = Server::start(dir.path(), &["--model", &sd1, "--models-dir", &all]);
    let (_, models) = server.get("/sdapi/v1/sd-models");
    let titles: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        titles,
        [
            "tiny-sd1",
            "tiny-lcm",
            "tiny-sd1-inpaint",
            "tiny-sd2",
            "tiny-sdxl"
        ]
    );
    assert_eq!(
        server.get("/sdapi/v1/options").1["sd_model_checkpoint"],
        "tiny-sd1"
    );
    let made_by = |body: Value| {
        let (status, answer) = server.post_json("/sdapi/v1/txt2img", &body);
        assert_eq!(status, 200, "{answer}");
        info(&answer)["sd_model_name"].as_str().unwrap().to_string()
    };
    let cat = json!({"prompt": "a cat", "steps": 2, "seed": 1});
    assert_eq!(made_by(cat.clone()), "tiny-sd1");

    let (status, _) = server.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "tiny-sd2", "CLIP_stop_at_last_layers": 2}),
    );
    assert_eq!(status, 200);
    let options = server.get("/sdapi/v1/options").1;
    assert_eq!(options["sd_model_checkpoint"], "tiny-sd2");
    assert_eq!(options["CLIP_stop_at_last_layers"], 2);
    assert_eq!(made_by(cat.clone()), "tiny-sd2");

    // A request's override is for that request (A1111 restores the option afterwards).
    let mut xl = cat.clone();
    xl["override_settings"] = json!({"sd_model_checkpoint": "tiny-sdxl [abc123]"});
    assert_eq!(made_by(xl), "tiny-sdxl");
    assert_eq!(
        server.get("/sdapi/v1/options").1["sd_model_checkpoint"],
        "tiny-sd2"
    );
    assert_eq!(made_by(cat.clone()), "tiny-sd2");

    let (status, answer) =
        server.post_json("/sdapi/v1/options", &json!({"sd_model_checkpoint": "nope"}));
    assert_eq!(status, 422);
    assert_eq!(
        answer["detail"][0]["loc"],
        json!(["body", "sd_model_checkpoint"])
    );
    let mut unknown = cat;
    unknown["override_settings"] = json!({"sd_model_checkpoint": "nope"});
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &unknown);
    assert_eq!(status, 422);
    assert_eq!(
        answer["detail"][0]["loc"],
        json!(["body", "override_settings", "sd_model_checkpoint"])
    );
}

#[test]
fn progress_previews_interrupt_and_a_client_that_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--model", &model("tiny-sd1")]);
    let idle = server.get("/sdapi/v1/progress").1;
    assert_eq!(idle["progress"], json!(0.0));
    assert_eq!(idle["state"]["job_count"], json!(0));
    assert_eq!(idle["current_image"], Value::Null);

    let job = in_background(&server, long_request());
    let p = server.wait_progress(60, |p| {
        p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 6 && !p["current_image"].is_null()
    });
    assert_eq!(p["state"]["job"], "txt2img");
    assert_eq!(p["state"]["job_count"], json!(50));
    assert_eq!(p["state"]["sampling_steps"], json!(1000));
    let progress = p["progress"].as_f64().unwrap();
    assert!(progress > 0.01 && progress < 0.05, "{progress}");
    assert!(p["eta_relative"].as_f64().unwrap() > 0.0);
    let (preview, _) = png(&b64(p["current_image"].as_str().unwrap()));
    assert_eq!(preview.len(), 64 * 64 * 3, "a preview at image size");

    let (status, _) = server.post("/sdapi/v1/interrupt", "");
    assert_eq!(status, 200);
    let (status, answer) = job.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(info(&answer)["interrupted"], json!(true));
    assert_eq!(
        answer["images"],
        json!([]),
        "stopped inside the first batch"
    );
    server.wait_progress(10, |p| p["state"]["job_count"] == json!(0));

    // A client that disconnects cancels its job.
    let mut raw = TcpStream::connect(server.address()).unwrap();
    let body = long_request().to_string();
    write!(
        raw,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    server.wait_progress(60, |p| {
        p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0
    });
    drop(raw);
    server.wait_progress(20, |p| p["state"]["job_count"] == json!(0));
    let start = Instant::now();
    while !server.log().contains("client disconnected") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the server goes on.
    let (status, _) =
        server.post_json("/sdapi/v1/txt2img", &json!({"prompt": "a cat", "steps": 2}));
    assert_eq!(status, 200);
}

#[test]
fn bad_requests_get_422_naming_the_field_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--model", &model("tiny-sd1")]);
    let cases: &[(&str, &[&str])] = &[
        (r#"{"prompt": "a cat", "steps": "many"}"#, &["steps"]),
        (
            r#"{"prompt": "a cat", "width": "wide", "cfg_scale": [7]}"#,
            &["width", "cfg_scale"],
        ),
        (r#"{"negative_prompt": "x"}"#, &["prompt"]),
        (r#"{"prompt": "a cat", "width": 100000}"#, &["width"]),
        (r#"{"prompt": "a cat", "height": 70}"#, &["height"]),
        (
            r#"{"prompt": "a cat", "sampler_name": "Heun"}"#,
            &["sampler_name"],
        ),
        (
            r#"{"prompt": "a cat", "scheduler": "Exponentional"}"#,
            &["scheduler"],
        ),
        (
            r#"{"prompt": "a cat", "sampler_name": "Euler a", "scheduler": "Karras"}"#,
            &["scheduler"],
        ),
        (r#"{"prompt": "a cat", "seed": -5}"#, &["seed"]),
        (r#"{"prompt": "a cat", "steps": 0}"#, &["steps"]),
        (
            r#"{"prompt": "a cat", "send_images": "perhaps"}"#,
            &["send_images"],
        ),
        (
            r#"{"prompt": "a cat", "negative_prompt": "(blurry:1.2.3)"}"#,
            &["negative_prompt"],
        ),
        (
            r#"{"prompt": "a cat", "override_settings": {"CLIP_stop_at_last_layers": 0}}"#,
            &["override_settings.CLIP_stop_at_last_layers"],
        ),
    ];
    for (body, fields) in cases {
        let (status, answer) = server.post("/sdapi/v1/txt2img", body);
        let short: String = answer.to_string().chars().take(300).collect();
        assert_eq!(status, 422, "{body}: {short}");
        let mut named: Vec<String> = answer["detail"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}: {answer}"))
            .iter()
            .map(|d| {
                let loc = d["loc"].as_array().unwrap();
                assert_eq!(loc[0], "body");
                assert!(!d["msg"].as_str().unwrap().is_empty());
                loc[1..]
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect();
        named.sort();
        let mut fields = fields.to_vec();
        fields.sort();
        assert_eq!(named, fields, "{body}: {answer}");
    }
    for body in ["{\"prompt\": ", "[1, 2]", "", "\u{0}"] {
        let (status, answer) = server.post("/sdapi/v1/txt2img", body);
        assert_eq!(status, 422, "{body:?}: {answer}");
        assert_eq!(answer["detail"][0]["loc"][0], "body");
    }
    let (status, answer) = server.post("/sdapi/v1/img2img", r#"{"init_images": ["abc"]}"#);
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["detail"][0]["loc"][1], "init_images", "{answer}");
    assert_eq!(answer["detail"][1]["loc"][1], "prompt", "{answer}");
    let (status, _) = server.get("/sdapi/v1/nothing-here");
    assert_eq!(status, 404);
    let (status, _) =
        server.post_json("/sdapi/v1/txt2img", &json!({"prompt": "a cat", "steps": 2}));
    assert_eq!(status, 200, "still serving");
}

#[test]
fn bodies_over_the_limit_get_413() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--model", &model("tiny-sd1"), "--max-body", "10000"],
    );
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(20_000));
    // The server answers from the Content-Length and closes without reading the body, so a
    // client still sending may see the connection reset instead of the answer: try again.
    let (status, answer) = (0..5)
        .find_map(|_| {
            let sent = ureq::post(&server.url("/sdapi/v1/txt2img"))
                .set("Content-Type", "application/json")
                .send_string(&big);
            match sent {
                Err(ureq::Error::Transport(_)) => None,
                r => Some(common::serve::reply(r)),
            }
        })
        .expect("an answer in five tries");
    assert_eq!(status, 413, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("--max-body"));
    // A client announcing 100 MB is answered without the server reading them.
    let mut raw = TcpStream::connect(server.address()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        raw,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100000000\r\n\r\n{{\"prompt\": \"aaaa"
    )
    .unwrap();
    let mut head = [0u8; 12];
    raw.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    let (status, _) =
        server.post_json("/sdapi/v1/txt2img", &json!({"prompt": "a cat", "steps": 2}));
    assert_eq!(status, 200, "still serving");
}

#[test]
fn api_auth_refuses_wrong_credentials_with_401() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--model",
            &model("tiny-sd1"),
            "--api-auth",
            "alice:s3cret,bob:pw",
        ],
    );
    let basic = |user_pass: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    };
    let url = server.url("/sdapi/v1/options");
    let (status, answer) = reply(ureq::get(&url).call());
    assert_eq!(status, 401);
    assert_eq!(answer["detail"], "Incorrect username or password");
    match ureq::get(&url).call() {
        Err(ureq::Error::Status(401, r)) => {
            assert!(r.header("WWW-Authenticate").unwrap().starts_with("Basic"))
        }
        other => panic!("expected 401: {other:?}"),
    }
    for wrong in [
        "alice:wrong",
        "alice:s3cret2",
        "mallory:s3cret",
        "alice",
        "bob:s3cret",
    ] {
        let (status, _) = reply(ureq::get(&url).set("Authorization", &basic(wrong)).call());
        assert_eq!(status, 401, "{wrong}");
    }
    let (status, _) = reply(ureq::get(&url).set("Authorization", "Basic !!!").call());
    assert_eq!(status, 401, "bad base64");
    for right in ["alice:s3cret", "bob:pw"] {
        let (status, _) = reply(ureq::get(&url).set("Authorization", &basic(right)).call());
        assert_eq!(status, 200, "{right}");
    }
    let (status, _) = reply(ureq::get(&server.url("/")).call());
    assert_eq!(status, 401, "the page too");
}

// Ctrl-C is sent as SIGINT.
#[cfg(unix)]
#[test]
fn a_full_queue_answers_503_and_ctrl_c_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--model", &model("tiny-sd1"), "--queue", "1"]);
    let running = in_background(&server, long_request());
    server.wait_progress(60, |p| {
        p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0
    });
    let waiting = in_background(&server, long_request());
    server.wait_progress(10, |p| p["state"]["queued"] == json!(1));
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &json!({"prompt": "a cat"}));
    assert_eq!(status, 503, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("queue is full"));

    let exit = server.interrupt_and_wait(30);
    assert!(exit.success(), "{exit:?}: {}", server.log());
    let (status, answer) = running.join().unwrap();
    assert_eq!(status, 200, "the job in flight is interrupted and answered");
    assert_eq!(info(&answer)["interrupted"], json!(true));
    let (status, _) = waiting.join().unwrap();
    assert_eq!(status, 503, "the queued one is refused");
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[test]
fn lists_and_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--model", &model("tiny-sd1")]);
    let (_, samplers) = server.get("/sdapi/v1/samplers");
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for name in ["Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS", "LCM"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let (_, schedulers) = server.get("/sdapi/v1/schedulers");
    assert_eq!(schedulers[1]["label"], "Karras");
    for empty in ["upscalers", "loras", "sd-vae"] {
        assert_eq!(
            server.get(&format!("/sdapi/v1/{empty}")).1,
            json!([]),
            "{empty}"
        );
    }
    assert_eq!(
        server.get("/sdapi/v1/embeddings").1,
        json!({"loaded": {}, "skipped": {}})
    );
    let page = ureq::get(&server.url("/")).call().unwrap();
    assert!(page.content_type().starts_with("text/html"));
    let html = page.into_string().unwrap();
    assert!(html.contains("/sdapi/v1/") && html.contains("progress"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing from other hosts"
    );
}

#[test]
fn img2img_and_inpainting_answer_what_generate_makes() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = model("tiny-sd1");
    let server = Server::start(dir.path(), &["--model", &tiny]);
    for (mask, strength) in [(None, 0.6), (Some("mask.png"), 0.8)] {
        let mut request = json!({
            "prompt": "a photo of a cat",
            "seed": 3,
            "steps": 8,
            "cfg_scale": 7.5,
            "sampler_name": "Euler",
            "denoising_strength": strength,
            "init_images": [format!("data:image/png;base64,{}", fixture_b64("init.png"))],
            "mask_blur": 0,
            "inpainting_fill": 1,
        });
        if let Some(m) = mask {
            request["mask"] = json!(fixture_b64(m));
        }
        let (status, answer) = server.post_json("/sdapi/v1/img2img", &request);
        assert_eq!(status, 200, "{answer}");
        let (pixels, text) = png(&b64(answer["images"][0].as_str().unwrap()));
        let i = info(&answer);
        assert_eq!(i["denoising_strength"], json!(strength));
        assert_eq!(i["width"], json!(32), "the picture's size");
        assert_eq!(answer["parameters"]["init_images"], Value::Null);
        assert!(
            text.contains(&format!("Denoising strength: {strength}")),
            "{text}"
        );

        let out = dir.path().join("alone.png");
        let init = fixtures().join("img2img/init.png");
        let mut generate = Command::new(env!("CARGO_BIN_EXE_latent"));
        generate
            .current_dir(dir.path())
            .env_remove("LATENT_MODEL")
            .args(["generate", "a photo of a cat", "--quiet", "--overwrite"])
            .args(["--model", &tiny, "--seed", "3", "--steps", "8"])
            .args(["--guidance", "7.5", "--scheduler", "euler"])
            .args(["--strength", &strength.to_string(), "--init-image"])
            .arg(&init)
            .arg("-o")
            .arg(&out);
        if let Some(m) = mask {
            generate
                .arg("--mask")
                .arg(fixtures().join("img2img").join(m));
        }
        let generated = generate.output().unwrap();
        assert!(generated.status.success(), "{}", stderr(&generated));
        let (alone, alone_text) = png(&std::fs::read(&out).unwrap());
        assert_eq!(text, alone_text, "the same parameters text");
        assert!(
            pixels == alone,
            "the server's image equals latent generate's"
        );
    }
}

#[test]
fn bad_img2img_requests_get_422_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--model", &model("tiny-sd1")]);
    let init = fixture_b64("init.png");
    let small = fixture_b64("mask.png");
    let big = fixture_b64("mask-xl.png");
    for (body, field) in [
        (json!({"prompt": "a cat"}), "init_images"),
        (
            json!({"prompt": "a cat", "init_images": ["%%%"]}),
            "init_images",
        ),
        (
            json!({"prompt": "a cat", "init_images": [base64::engine::general_purpose::STANDARD.encode("text")]}),
            "init_images",
        ),
        (
            json!({"prompt": "a cat", "init_images": [init.clone()], "mask": big}),
            "mask",
        ),
        (
            json!({"prompt": "a cat", "init_images": [init.clone()], "denoising_strength": 1.5}),
            "denoising_strength",
        ),
        (
            json!({"prompt": "a cat", "init_images": [init.clone()], "inpainting_fill": 4}),
            "inpainting_fill",
        ),
        (
            json!({"prompt": "a cat", "init_images": [init.clone()], "denoising_strength": 0.01, "steps": 4}),
            "denoising_strength",
        ),
    ] {
        let (status, answer) = server.post_json("/sdapi/v1/img2img", &body);
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["detail"][0]["loc"][1], json!(field), "{answer}");
    }
    // And it goes on serving.
    let ok =
        json!({"prompt": "a cat", "init_images": [init], "mask": small, "steps": 2, "seed": 1});
    let (status, answer) = server.post_json("/sdapi/v1/img2img", &ok);
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn loras_lists_the_lora_folder() {
    let dir = tempfile::tempdir().unwrap();
    let loras = fixtures().join("lora/sd1");
    let server = Server::start(
        dir.path(),
        &[
            "--model",
            &model("tiny-sd1"),
            "--lora-dir",
            loras.to_str().unwrap(),
        ],
    );
    let (status, list) = server.get("/sdapi/v1/loras");
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    let mut want: Vec<String> = std::fs::read_dir(&loras)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "safetensors")
                .then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    want.sort();
    assert!(!want.is_empty());
    assert_eq!(names, want);
}

#[test]
fn inpainting_fill_modes_make_other_pictures_and_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = model("tiny-sd1");
    let server = Server::start(dir.path(), &["--model", &tiny]);
    let inpaint = |fill: Option<u8>, blur: u8| {
        let mut request = json!({
            "prompt": "a photo of a cat",
            "seed": 11,
            "steps": 6,
            "sampler_name": "Euler",
            "denoising_strength": 0.7,
            "init_images": [fixture_b64("init.png")],
            "mask": fixture_b64("mask.png"),
            "mask_blur": blur,
        });
        if let Some(n) = fill {
            request["inpainting_fill"] = json!(n);
        }
        let (status, answer) = server.post_json("/sdapi/v1/img2img", &request);
        assert_eq!(status, 200, "{answer}");
        // AUTOMATIC1111's default "only masked" is not done, and the answer says so.
        assert_eq!(info(&answer)["ignored_fields"], json!(["inpaint_full_res"]));
        png(&b64(answer["images"][0].as_str().unwrap()))
    };
    let names = [
        Some("fill"),
        None,
        Some("latent noise"),
        Some("latent nothing"),
    ];
    let mut pictures = Vec::new();
    for (n, name) in names.iter().enumerate() {
        let (pixels, text) = inpaint(Some(n as u8), 4);
        match name {
            Some(name) => assert!(
                text.contains(&format!("Denoising strength: 0.7, Masked content: {name},")),
                "{text}"
            ),
            None => assert!(!text.contains("Masked content"), "{text}"),
        }
        assert!(
            !pictures.contains(&pixels),
            "inpainting_fill {n} makes its own picture"
        );
        pictures.push(pixels);
    }
    assert_eq!(
        inpaint(None, 4).0,
        pictures[0],
        "AUTOMATIC1111's default is 0, fill"
    );

    // The CLI's --masked-content runs the same (without a mask blur, which it does not have).
    for (n, flag) in [(0, "fill"), (2, "latent-noise"), (3, "latent-nothing")] {
        let (pixels, text) = inpaint(Some(n), 0);
        let out = dir.path().join(format!("{flag}.png"));
        let generated = Command::new(env!("CARGO_BIN_EXE_latent"))
            .current_dir(dir.path())
            .env_remove("LATENT_MODEL")
            .args(["generate", "a photo of a cat", "--quiet", "--model", &tiny])
            .args([
                "--seed",
                "11",
                "--steps",
                "6",
                "--guidance",
                "7",
                "--scheduler",
            ])
            .args(["euler", "--strength", "0.7", "--masked-content", flag])
            .arg("--init-image")
            .arg(fixtures().join("img2img/init.png"))
            .arg("--mask")
            .arg(fixtures().join("img2img/mask.png"))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(generated.status.success(), "{}", stderr(&generated));
        let (alone, alone_text) = png(&std::fs::read(&out).unwrap());
        assert_eq!(text, alone_text, "{flag}");
        assert!(pixels == alone, "{flag}: the server's picture is the CLI's");
    }
}
