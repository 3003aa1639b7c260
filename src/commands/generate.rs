//! `latent generate`: one prompt, one or more images.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use latent::pipeline::{
    check_request, load_latents, mask_luma, read_image, Event, GenerateRequest, ImageInput,
    Residency,
};
use latent::{output, Cancel, Setting};

use super::{load_model, random_seed, sampling_for};
use crate::cli::GenerateArgs;
use crate::progress::Progress;

/// `latent generate`.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let started = Instant::now();
    let mut progress = Progress::new(args.quiet);
    // The cheap checks first: a huge count fails before its seeds and paths are planned.
    check_request(
        &args.prompt,
        &args.sampling.negative_prompt,
        args.num_images,
        args.batch_size,
    )?;
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

    // The pictures are read before the model: a bad file fails at once.
    let init = match &args.init_image {
        Some(path) => Some(read_image(path, Setting::InitImage)?),
        None => None,
    };
    let mask = match &args.mask {
        Some(path) => Some(mask_luma(&read_image(path, Setting::Mask)?)),
        None => None,
    };

    let model = load_model(&args.model, Residency::Staged, &mut progress)?;
    let mut sampling = sampling_for(&model, &args.sampling)?;
    if let Some(image) = init {
        let strength = args
            .strength
            .unwrap_or(if mask.is_some() { 1.0 } else { 0.8 });
        let input = ImageInput::new(image, mask, strength).with_masked_content(args.masked_content);
        let (w, h) = model.default_size_for(Some(&input));
        sampling.width = args.sampling.width.unwrap_or(w);
        sampling.height = args.sampling.height.unwrap_or(h);
        sampling.image = Some(Arc::new(input));
    }
    sampling.preview_every = args.preview_every.map(|n| n as usize);
    let preview_path = preview_path(args.output.as_deref(), &paths);
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.sampling.negative_prompt.clone(),
        sampling,
        seeds: seeds.clone(),
        batch_size: args.batch_size,
        latents,
    };
    model.check_inputs(&req)?;
    let s = &req.sampling;
    // The scheduler's own step count (PNDM runs one extra) sizes the progress bar; building it
    // also rejects --karras for schedulers without it before any work.
    let per_batch = model.loop_steps(s)?;
    let batches = seeds.len().div_ceil(req.batch_size);
    progress.set_total_steps((per_batch * batches) as u64);

    let generation = model.generate(&req, &Cancel::new(), &mut |e| match e {
        Event::Preview { images, .. } => {
            // The first image of the batch; a failed preview write only warns.
            if let Some(img) = images.first() {
                let written = output::write_png(
                    &preview_path,
                    &img.rgb,
                    img.width as u32,
                    img.height as u32,
                    "",
                    true,
                );
                if let Err(err) = written {
                    progress.println(&format!("warning: preview not written: {err}"));
                }
            }
        }
        other => progress.event(other),
    })?;
    progress.finish();

    let t = &generation.timings;
    latent::generate::write_images(
        &model,
        &req,
        &generation,
        &paths,
        args.overwrite,
        &mut |record| {
            if args.json {
                match serde_json::to_string(record) {
                    Ok(line) => println!("{line}"),
                    Err(e) => eprintln!("warning: cannot print the JSON record: {e}"),
                }
            } else if !args.quiet {
                eprintln!("wrote {} (seed {})", record.path.display(), record.seed);
            }
        },
    )?;
    if !args.quiet {
        // Say what the user asked for (steps per image) and what ran: PNDM adds warm-up
        // steps (Runge-Kutta ones without skip_prk_steps), and each batch runs its own loop.
        eprintln!(
            "load {:.2}s, text encode {:.2}s, {} steps x {} image(s): {} UNet calls at {:.3}s each, \
             decode {:.2}s, total {:.2}s",
            model.load_time().as_secs_f64(),
            t.text_encode.as_secs_f64(),
            s.steps,
            seeds.len(),
            t.unet_steps,
            t.seconds_per_step(),
            t.decode.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Where previews go: `NAME.preview.png` beside an output file `NAME.png` given with `-o`,
/// else `preview.png` in the folder the images go to.
fn preview_path(output: Option<&Path>, paths: &[PathBuf]) -> PathBuf {
    let is_file = output
        .and_then(Path::extension)
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    match (output, is_file) {
        (Some(file), true) => {
            let stem = file.file_stem().unwrap_or_default().to_string_lossy();
            file.with_file_name(format!("{stem}.preview.png"))
        }
        _ => paths
            .first()
            .and_then(|p| p.parent())
            .unwrap_or(Path::new("."))
            .join("preview.png"),
    }
}
