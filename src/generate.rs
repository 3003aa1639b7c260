//! The end of a `generate` run: each image of a [`Generation`] written as a PNG that carries its
//! parameters, and a typed record of it (what `--json` prints and a server returns).
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::output::{write_image, GenerationParams};
use crate::pipeline::{GenerateRequest, Generation, StableDiffusion};
use crate::{Error, Result};

/// One written image and everything needed to make it again.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRecord {
    pub path: PathBuf,
    pub seed: u64,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: String,
    pub karras: bool,
    pub rng: String,
    pub batch_size: usize,
    pub model: String,
    pub device: String,
    pub dtype: String,
    /// The `parameters` text stored in the PNG.
    pub parameters: String,
    pub timings: ImageTimings,
}

/// Stage times of the run that made the image (shared by its images).
#[derive(Debug, Clone, Serialize)]
pub struct ImageTimings {
    pub load_s: f64,
    pub text_encode_s: f64,
    pub denoise_s: f64,
    pub seconds_per_step: f64,
    pub decode_s: f64,
}

/// Writes image i of `generation` to `paths[i]` (atomically; an existing file is an error
/// unless `overwrite`), calling `on_written` after each, and returns the records in order.
pub fn write_images(
    model: &StableDiffusion,
    req: &GenerateRequest,
    generation: &Generation,
    paths: &[PathBuf],
    overwrite: bool,
    on_written: &mut dyn FnMut(&ImageRecord),
) -> Result<Vec<ImageRecord>> {
    if paths.len() != generation.images.len() {
        return Err(Error::InvalidInput(format!(
            "internal error: {} output paths for {} images",
            paths.len(),
            generation.images.len()
        )));
    }
    let s = &req.sampling;
    let t = &generation.timings;
    let timings = ImageTimings {
        load_s: model.load_time().as_secs_f64(),
        text_encode_s: t.text_encode.as_secs_f64(),
        denoise_s: t.denoise.as_secs_f64(),
        seconds_per_step: t.seconds_per_step(),
        decode_s: t.decode.as_secs_f64(),
    };
    generation
        .images
        .iter()
        .zip(paths)
        .map(|(image, path)| {
            let mut params = GenerationParams::for_image(
                model,
                &req.prompt,
                &req.negative_prompt,
                s,
                image.seed,
            );
            if req.latents.is_some() {
                // The seed did not make the starting noise: say so, or the text would claim
                // that the seed reproduces the image.
                params.extra.push(("Latents".into(), "from file".into()));
            }
            let parameters = params.to_a1111();
            write_image(path, image, &parameters, overwrite)?;
            let record = ImageRecord {
                path: Path::to_path_buf(path),
                seed: image.seed,
                prompt: req.prompt.clone(),
                negative_prompt: req.negative_prompt.clone(),
                width: s.width,
                height: s.height,
                steps: s.steps,
                guidance: s.guidance,
                scheduler: s.scheduler.to_string(),
                karras: s.karras,
                rng: s.rng.to_string(),
                batch_size: req.batch_size,
                model: model.name().to_string(),
                device: format!("{:?}", model.device().location()),
                dtype: format!("{:?}", model.dtype()).to_lowercase(),
                parameters,
                timings: timings.clone(),
            };
            on_written(&record);
            Ok(record)
        })
        .collect()
}
