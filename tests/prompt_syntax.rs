//! AUTOMATIC1111's prompt syntax against AUTOMATIC1111's own code: schedules (prompt editing,
//! alternation) and emphasis runs of 630 parse cases (75 written prompts and 240 random ones,
//! at 10 and 20 steps), and the conditioning of 12 prompts on the tiny SD 1.x (clip skip 1 and
//! 2), SD 2.x and SDXL encoders, chunked and weighted as AUTOMATIC1111 does.
//! Goldens: tests/fixtures/prompts/, made by tools/make_prompt_fixtures.py.
use candle_core::{DType, Device, Tensor};
use latent::model::ModelSource;
use latent::pipeline::{StableDiffusion, TextConditioning};
use latent::prompt::{parse_attention, schedule, PromptSyntax, TextOptions};
use serde_json::Value;

mod common;
use common::{assert_close, fixtures, max_abs_diff};

fn json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("prompts").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn schedules_and_emphasis_match_automatic1111() {
    let cases = json("parse.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 600, "{} cases", cases.len());
    let mut checked = 0;
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let want = case["schedule"].as_array().unwrap();
        let got = schedule(prompt, steps);
        let got_pairs: Vec<(i64, &str)> = got.iter().map(|s| (s.until, s.text.as_str())).collect();
        let want_pairs: Vec<(i64, &str)> = want
            .iter()
            .map(|e| (e["until"].as_i64().unwrap(), e["text"].as_str().unwrap()))
            .collect();
        assert_eq!(
            got_pairs, want_pairs,
            "schedule of {prompt:?} at {steps} steps"
        );
        for entry in want {
            let text = entry["text"].as_str().unwrap();
            let runs = parse_attention(text);
            match entry["attention"].as_array() {
                // AUTOMATIC1111's float() raised on the weight: an error here too.
                None => assert!(runs.is_err(), "{text:?} parsed: {runs:?}"),
                Some(want_runs) => {
                    let runs = runs.unwrap();
                    assert_eq!(runs.len(), want_runs.len(), "runs of {text:?}: {runs:?}");
                    for (r, w) in runs.iter().zip(want_runs) {
                        assert_eq!(r.text, w[0].as_str().unwrap(), "text of {text:?}");
                        let weight = w[1].as_f64().unwrap();
                        assert!(
                            (r.weight - weight).abs() <= 1e-12 * weight.abs().max(1.0),
                            "weight of {:?} in {text:?}: {} vs {weight}",
                            r.text,
                            r.weight
                        );
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 900, "{checked} texts");
}

fn load(name: &str) -> StableDiffusion {
    let dir = fixtures().join(name);
    let files = ModelSource::parse(&dir.display().to_string(), None)
        .unwrap()
        .open()
        .unwrap();
    StableDiffusion::load(&files, &Device::Cpu, DType::F32, &mut |_| {}).unwrap()
}

#[test]
fn conditioning_matches_automatic1111_chunking_and_emphasis() {
    let index = json("cond.json");
    let golden =
        candle_core::safetensors::load(fixtures().join("prompts/cond.safetensors"), &Device::Cpu)
            .unwrap();
    let models = [
        ("sd1", "tiny-sd1", 1),
        ("sd1-skip2", "tiny-sd1", 2),
        ("sd2", "tiny-sd2", 1),
        ("sdxl", "tiny-sdxl", 1),
    ];
    let mut compared = 0;
    for (name, dir, clip_skip) in models {
        let model = load(dir);
        let text = TextOptions {
            syntax: PromptSyntax::A1111,
            clip_skip,
        };
        for case in index
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["model"] == name)
        {
            let prompt = case["prompt"].as_str().unwrap();
            let steps = case["steps"].as_u64().unwrap() as usize;
            let i = case["case"].as_u64().unwrap();
            // Guidance 1: the prompt alone (the negative prompt goes the same way).
            let e = model
                .encode_prompt_with(prompt, "", 1.0, &text, steps, &mut |_| {})
                .unwrap();
            let entries: Vec<(i64, TextConditioning)> = match &e.schedule {
                Some(s) => s.cond.clone(),
                None => vec![(steps as i64, e.cond.clone())],
            };
            let until: Vec<i64> = case["until"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u.as_i64().unwrap())
                .collect();
            assert_eq!(
                entries.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
                until,
                "{name} {prompt:?}"
            );
            for (j, (_, cond)) in entries.iter().enumerate() {
                let key = format!("{name}/{i}/{j}");
                assert_close(&cond.context, &golden[&key], &key);
                if let Some(p) = golden.get(&format!("{key}/pooled")) {
                    assert_close(cond.pooled.as_ref().unwrap(), p, &format!("{key}/pooled"));
                }
                compared += 1;
            }
        }
    }
    assert!(compared >= 48, "{compared} conditionings compared");
}

#[test]
fn plain_syntax_is_diffusers_and_a1111_equals_it_on_simple_prompts() {
    let model = load("tiny-sd1");
    let plain = TextOptions {
        syntax: PromptSyntax::Plain,
        clip_skip: 1,
    };
    let a1111 = TextOptions::default();
    let p = "a photo of a cat";
    let diffusers = model.encode_prompt(p, "", 7.5, &mut |_| {}).unwrap();
    let e_plain = model
        .encode_prompt_with(p, "", 7.5, &plain, 20, &mut |_| {})
        .unwrap();
    let e_a1111 = model
        .encode_prompt_with(p, "", 7.5, &a1111, 20, &mut |_| {})
        .unwrap();
    for e in [&e_plain, &e_a1111] {
        assert_eq!(max_abs_diff(&e.cond.context, &diffusers.cond.context), 0.0);
        assert!(e.schedule.is_none());
    }
    // Emphasis only in AUTOMATIC1111's syntax: plain reads the brackets as text.
    let weighted = "a photo of a (cat:1.5)";
    let a = model
        .encode_prompt_with(weighted, "", 7.5, &a1111, 20, &mut |_| {})
        .unwrap();
    let b = model
        .encode_prompt_with(weighted, "", 7.5, &plain, 20, &mut |_| {})
        .unwrap();
    assert_eq!(
        max_abs_diff(
            &b.cond.context,
            &model
                .encode_prompt(weighted, "", 7.5, &mut |_| {})
                .unwrap()
                .cond
                .context
        ),
        0.0
    );
    assert!(max_abs_diff(&a.cond.context, &b.cond.context) > 1e-3);
}

#[test]
fn clip_skip_out_of_range_is_one_clear_error() {
    let model = load("tiny-sd1");
    let text = TextOptions {
        syntax: PromptSyntax::A1111,
        clip_skip: 3,
    };
    let err = model
        .encode_prompt_with("a", "", 7.5, &text, 20, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("clip_skip 3") && err.contains("between 1 and 2"),
        "{err}"
    );
}

/// The final latents of `prompt` on the tiny SD 1.x model: 6 Euler steps, guidance 7.5.
fn latents_of(model: &StableDiffusion, prompt: &str, negative: &str) -> Tensor {
    latents_in(model, prompt, negative, TextOptions::default())
}

fn latents_in(model: &StableDiffusion, prompt: &str, negative: &str, text: TextOptions) -> Tensor {
    let mut req = common::request(prompt, 32, 6, "euler", 7);
    req.negative_prompt = negative.into();
    req.sampling.text = text;
    let out = model
        .generate(&req, &latent::Cancel::new(), &mut |_| {})
        .unwrap();
    out.images[0].latents.clone()
}

#[test]
fn prompt_editing_switches_the_conditioning_between_steps() {
    let model = load("tiny-sd1");
    let (a, b) = ("a red house", "a blue boat");
    let only_a = latents_of(&model, a, "");
    let only_b = latents_of(&model, b, "");
    // A switch at step 0 is no switch (AUTOMATIC1111 keeps entries from step 1 on); one at or
    // past the last step never happens.
    let at_0 = latents_of(&model, &format!("[{a}:{b}:0]"), "");
    assert_eq!(max_abs_diff(&at_0, &only_b), 0.0);
    let at_end = latents_of(&model, &format!("[{a}:{b}:6]"), "");
    assert_eq!(max_abs_diff(&at_end, &only_a), 0.0);
    // A switch in between gives a third picture, as does alternation.
    let mid = latents_of(&model, &format!("[{a}:{b}:3]"), "");
    let alt = latents_of(&model, &format!("[{a}|{b}]"), "");
    for (x, what) in [(&mid, "edit"), (&alt, "alternation")] {
        assert!(max_abs_diff(x, &only_a) > 1e-4, "{what} = only a");
        assert!(max_abs_diff(x, &only_b) > 1e-4, "{what} = only b");
    }
    // Editing the negative prompt works the same way.
    let neg = latents_of(&model, a, &format!("[{b}::3]"));
    assert!(max_abs_diff(&neg, &only_a) > 1e-4);
}

#[test]
fn a_long_prompt_and_a_short_negative_prompt_run_as_two_unet_batches() {
    let model = load("tiny-sd1");
    let long = format!("{}, a red house", "tree, ".repeat(60));
    let l = latents_of(&model, &long, "blurry");
    assert_eq!(l.dims(), &[4, 4, 4]);
    assert!(l
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
    // The same prompt cut at 77 tokens (plain syntax) gives another picture: the words past
    // the first chunk count in AUTOMATIC1111's syntax.
    let plain = TextOptions {
        syntax: PromptSyntax::Plain,
        clip_skip: 1,
    };
    assert!(max_abs_diff(&l, &latents_in(&model, &long, "blurry", plain)) > 1e-4);
}
