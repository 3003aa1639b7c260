//! What each subcommand does: load the model, call the library's stages, write files, report.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use latent::model::ModelSource;
use latent::output::{self, GenerationParams};
use latent::pipeline::{load_latents, GenerateRequest, StableDiffusion};
use latent::schedulers::SchedulerKind;

use crate::cli::{GenerateArgs, ModelArgs, SamplingArgs};
use crate::progress::Progress;

/// Environment variable naming the default model.
const MODEL_ENV: &str = "LATENT_MODEL";

/// The model to use: `--model`, else `$LATENT_MODEL`, else the bundled model folder.
fn model_source(args: &ModelArgs) -> Result<ModelSource> {
    let spec = match (
        &args.model,
        std::env::var(MODEL_ENV).ok().filter(|s| !s.is_empty()),
    ) {
        (Some(m), _) => m.clone(),
        (None, Some(env)) => env,
        (None, None) => {
            let bundled = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("weights")
                .join("demo");
            if !bundled.join("model_index.json").is_file() {
                bail!(
                    "no model given: pass --model <folder or hub id> (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or set {MODEL_ENV}"
                );
            }
            bundled.display().to_string()
        }
    };
    Ok(ModelSource::parse(&spec, args.revision.as_deref())?)
}

/// Loads the model named by `args`, reporting progress.
pub fn load_model(args: &ModelArgs, progress: &mut Progress) -> Result<StableDiffusion> {
    let source = model_source(args)?;
    let device = args.device.open()?;
    let dtype = args.dtype.resolve(&device);
    let files = source.open()?;
    let model = StableDiffusion::load(&files, &device, dtype, &mut |e| progress.event(e))?;
    Ok(model)
}

/// A random seed in A1111's range (32 bits), from the clock and the process id.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() & 0xFFFF_FFFF
}

/// Settings that fill the image metadata.
pub fn params_for(
    model: &StableDiffusion,
    prompt: &str,
    sampling: &SamplingArgs,
    scheduler: SchedulerKind,
    width: usize,
    height: usize,
    seed: u64,
) -> GenerationParams {
    GenerationParams {
        prompt: prompt.to_string(),
        negative_prompt: sampling.negative_prompt.clone(),
        steps: sampling.steps,
        sampler: scheduler.a1111_name().to_string(),
        schedule_type: sampling.karras.then(|| "Karras".to_string()),
        cfg_scale: sampling.guidance,
        seed,
        width,
        height,
        model: model.name().to_string(),
        extra: vec![("RNG".into(), sampling.rng.to_string())],
    }
}

/// `latent generate`.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let started = Instant::now();
    let mut progress = Progress::new(args.quiet);
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(random_seed);
    let seeds: Vec<u64> = (0..args.num_images as u64)
        .map(|i| {
            seed.checked_add(i)
                .context("--seed: seed + image index overflows")
        })
        .collect::<Result<_>>()?;
    // Plan the files first: a name clash fails now, not after minutes of work.
    let paths = output::plan_output_paths(
        args.output.as_deref(),
        Path::new("outputs"),
        &seeds,
        args.overwrite,
    )?;
    let latents = match &args.latents {
        Some(p) => Some(load_latents(p)?),
        None => None,
    };
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty: give a text to draw, e.g. latent generate \"a red circle\"");
    }

    let model = load_model(&args.model, &mut progress)?;
    let load_time = started.elapsed();
    let s = &args.sampling;
    let scheduler = match s.scheduler {
        Some(k) => k,
        None => model.default_scheduler()?,
    };
    let size = model.default_size();
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: s.negative_prompt.clone(),
        width: s.width.unwrap_or(size),
        height: s.height.unwrap_or(size),
        steps: s.steps,
        guidance: s.guidance,
        scheduler,
        karras: s.karras,
        seeds: seeds.clone(),
        batch_size: args.batch_size,
        rng: s.rng,
        latents,
    };
    model.check_inputs(&req)?;
    // The scheduler's own step count (PNDM runs one extra) sizes the progress bar; building it
    // also rejects --karras for schedulers without it before any work.
    let per_batch = model
        .scheduler(scheduler, req.steps, req.karras)?
        .timesteps()
        .len();
    let batches = seeds.len().div_ceil(req.batch_size);
    progress.set_total_steps((per_batch * batches) as u64);

    let generation = model.generate(&req, &mut |e| progress.event(e))?;
    progress.finish();

    let t = &generation.timings;
    for (image, path) in generation.images.iter().zip(&paths) {
        let params = params_for(
            &model,
            &req.prompt,
            s,
            scheduler,
            req.width,
            req.height,
            image.seed,
        );
        output::write_png(
            path,
            &image.rgb,
            image.width as u32,
            image.height as u32,
            &params.to_a1111(),
            args.overwrite,
        )?;
        if args.json {
            let record = serde_json::json!({
                "path": path,
                "seed": image.seed,
                "prompt": req.prompt,
                "negative_prompt": req.negative_prompt,
                "width": req.width,
                "height": req.height,
                "steps": req.steps,
                "guidance": req.guidance,
                "scheduler": scheduler.to_string(),
                "karras": req.karras,
                "rng": req.rng.to_string(),
                "batch_size": req.batch_size,
                "model": model.name(),
                "device": format!("{:?}", model.device().location()),
                "dtype": format!("{:?}", model.dtype()).to_lowercase(),
                "parameters": params.to_a1111(),
                "timings": {
                    "load_s": load_time.as_secs_f64(),
                    "text_encode_s": t.text_encode.as_secs_f64(),
                    "denoise_s": t.denoise.as_secs_f64(),
                    "seconds_per_step": t.seconds_per_step(),
                    "decode_s": t.decode.as_secs_f64(),
                },
            });
            println!("{record}");
        } else if !args.quiet {
            eprintln!("wrote {} (seed {})", path.display(), image.seed);
        }
    }
    if !args.quiet {
        eprintln!(
            "load {:.2}s, text encode {:.2}s, {} steps at {:.3}s/step, decode {:.2}s, total {:.2}s",
            load_time.as_secs_f64(),
            t.text_encode.as_secs_f64(),
            t.unet_steps,
            t.seconds_per_step(),
            t.decode.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `latent info FILE...`.
pub fn info(files: &[PathBuf]) -> Result<()> {
    let mut missing = 0;
    for (i, f) in files.iter().enumerate() {
        if files.len() > 1 {
            if i > 0 {
                println!();
            }
            println!("{}:", f.display());
        }
        match output::read_png_parameters(f)? {
            Some(text) => println!("{text}"),
            None => {
                eprintln!("{}: no generation parameters in this PNG", f.display());
                missing += 1;
            }
        }
    }
    if missing > 0 {
        bail!("{missing} file(s) had no parameters");
    }
    Ok(())
}
