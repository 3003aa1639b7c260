//! `latent bench`: times each stage of one generation (load, text encode, seconds per UNet
//! step, VAE decode) and the peak memory, for side-by-side runs against other tools.
use std::time::Instant;

use anyhow::{bail, Result};
use latent::kernels::profile;
use latent::pipeline::{Event, Residency, Stage, Timings};
use latent::Cancel;

use super::{load_model, sampling_for};
use crate::cli::BenchArgs;
use crate::progress::Progress;

/// Peak resident memory of this process in bytes (Linux `VmHWM`), when known.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `latent bench`.
pub fn bench(args: BenchArgs) -> Result<()> {
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    if let Some(n) = args.threads {
        // candle's CPU kernels and rayon read this before their pools start.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let mut progress = Progress::new(true);
    // Staged like `latent generate` (one component in memory at a time), or all resident like
    // `latent batch`/`walk`. Loads are timed apart from the stages they precede.
    let residency = if args.resident {
        Residency::Resident
    } else {
        Residency::Staged
    };
    let model = load_model(&args.model, residency, &mut progress)?;
    let sampling = sampling_for(&model, &args.sampling)?;
    let req = latent::pipeline::GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.sampling.negative_prompt.clone(),
        sampling: sampling.clone(),
        seeds: vec![args.seed],
        batch_size: 1,
        latents: None,
    };
    model.check_inputs(&req)?;

    let mut timings = Timings::default();
    model.ensure_loaded(Stage::TextEncode, &mut |_| {})?;
    let t = Instant::now();
    let embeddings = model.encode_prompt_with(
        &req.prompt,
        &req.negative_prompt,
        sampling.guidance,
        &sampling.text,
        sampling.steps,
        &mut |_| {},
    )?;
    timings.text_encode = t.elapsed();
    let mut step_times = Vec::new();
    let mut unet_profile = Vec::new();
    model.ensure_loaded(Stage::Denoise, &mut |_| {})?;
    profile::enable(args.profile);
    let mut last = Instant::now();
    let latents = model.denoise_batch(
        &embeddings,
        &req.seeds,
        None,
        &sampling,
        0,
        &mut timings,
        &Cancel::new(),
        &mut |e| {
            if let Event::Step { step, steps, .. } = e {
                step_times.push(last.elapsed().as_secs_f64());
                if step == steps {
                    unet_profile = profile::snapshot();
                    profile::reset();
                }
                last = Instant::now();
            }
        },
    )?;
    // Not timed as decode: loading the VAE (and, staged, dropping the UNet).
    profile::enable(false);
    model.ensure_loaded(Stage::Decode, &mut |_| {})?;
    profile::enable(args.profile);
    model.decode_batch(
        &latents,
        &req.seeds,
        &sampling,
        0,
        &mut timings,
        &mut |_| {},
    )?;
    let load = model.load_time();
    // The first step pays one-time costs (allocations, page faults of the mapped weights);
    // report the median of the others when there are any.
    let steady: Vec<f64> = if step_times.len() > 1 {
        step_times[1..].to_vec()
    } else {
        step_times.clone()
    };
    let mut sorted = steady.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let decode_profile = profile::snapshot();
    profile::enable(false);
    let peak = peak_rss_bytes();
    let threads = candle_core::utils::get_num_threads();
    let mut record = serde_json::json!({
        "model": model.name(),
        "width": sampling.width,
        "height": sampling.height,
        "steps": step_times.len(),
        "guidance": sampling.guidance,
        "scheduler": sampling.scheduler.to_string(),
        "dtype": format!("{:?}", model.dtype()).to_lowercase(),
        "device": format!("{:?}", model.device().location()),
        "threads": threads,
        "residency": format!("{residency:?}").to_lowercase(),
        "load_s": load.as_secs_f64(),
        "text_encode_s": timings.text_encode.as_secs_f64(),
        "step_s_median": median,
        "step_s_first": step_times.first().copied().unwrap_or(0.0),
        "step_s_all": step_times,
        "decode_s": timings.decode.as_secs_f64(),
        "peak_rss_bytes": peak,
        "kernels": latent::kernels::describe(),
    });
    if args.profile {
        let total_steps: f64 = step_times.iter().sum();
        record["profile"] = serde_json::json!({
            "unet": profile_json(&unet_profile, total_steps, step_times.len()),
            "decode": profile_json(&decode_profile, timings.decode.as_secs_f64(), 1),
        });
    }
    if args.json {
        println!("{record}");
    } else {
        println!("model        {}", model.name());
        println!(
            "size         {}x{}, {} steps, guidance {}, {}, {:?}, {threads} threads",
            sampling.width,
            sampling.height,
            record["steps"],
            sampling.guidance,
            sampling.scheduler,
            model.dtype()
        );
        println!("residency    {residency:?}");
        println!("load         {:8.3} s", load.as_secs_f64());
        println!("text encode  {:8.3} s", timings.text_encode.as_secs_f64());
        println!(
            "UNet step    {median:8.3} s (median; first {:.3} s)",
            record["step_s_first"].as_f64().unwrap_or(0.0)
        );
        println!("VAE decode   {:8.3} s", timings.decode.as_secs_f64());
        match peak {
            Some(b) => println!("peak RSS     {:8.2} GB", b as f64 / 1e9),
            None => println!("peak RSS     unknown on this platform"),
        }
        println!("kernels      {}", record["kernels"].as_str().unwrap_or(""));
        if args.profile {
            let total_steps: f64 = step_times.iter().sum();
            print_profile(
                "UNet, per step",
                &unet_profile,
                total_steps,
                step_times.len(),
            );
            print_profile(
                "VAE decode",
                &decode_profile,
                timings.decode.as_secs_f64(),
                1,
            );
        }
    }
    Ok(())
}

/// Rows of a profile per call of the stage (`runs` steps), plus the time no kernel accounts for.
fn profile_rows(entries: &[profile::Entry], total: f64, runs: usize) -> Vec<(String, f64, f64)> {
    let runs = runs.max(1) as f64;
    let mut rows: Vec<(String, f64, f64)> = entries
        .iter()
        .filter(|e| e.calls > 0)
        .map(|e| {
            let gflops = if e.seconds > 0.0 {
                e.flops as f64 / e.seconds / 1e9
            } else {
                0.0
            };
            (e.op.name().to_string(), e.seconds / runs, gflops)
        })
        .collect();
    let accounted: f64 = entries.iter().map(|e| e.seconds).sum();
    rows.push((
        "other (element-wise, copies)".into(),
        ((total - accounted) / runs).max(0.0),
        0.0,
    ));
    rows
}

fn print_profile(title: &str, entries: &[profile::Entry], total: f64, runs: usize) {
    println!("\n{title}: {:.3} s", total / runs.max(1) as f64);
    for (name, secs, gflops) in profile_rows(entries, total, runs) {
        let share = 100.0 * secs * runs.max(1) as f64 / total.max(1e-12);
        if gflops > 0.0 {
            println!("  {name:<30}{secs:8.3} s {share:5.1}%  {gflops:6.1} GFLOP/s");
        } else {
            println!("  {name:<30}{secs:8.3} s {share:5.1}%");
        }
    }
}

fn profile_json(entries: &[profile::Entry], total: f64, runs: usize) -> serde_json::Value {
    profile_rows(entries, total, runs)
        .into_iter()
        .map(|(name, secs, gflops)| serde_json::json!({"op": name, "s": secs, "gflops": gflops}))
        .collect()
}
