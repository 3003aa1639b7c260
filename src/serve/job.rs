//! One txt2img request as a batch run: the request becomes a one-line prompt source, runs
//! through [`Batch`] (the loop `latent batch` uses: plan, UNet batches, parameters, manifest),
//! with its images kept in memory, or saved in a fresh folder with its manifest when the
//! request says `save_images`; the images and records come back as AUTOMATIC1111's answer.
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::Value;

use super::api::{Detail, ImagesResponse, Info};
use super::request::{setting_detail, Txt2Img};
use crate::batch::{
    sampler_name, validate_job, Access, Batch, BatchConfig, BatchEvent, Job, LineSpec, PromptFile,
    SeedFrom, Stop, DEFAULT_TEMPLATE,
};
use crate::noise::RngKind;
use crate::pipeline::{Sampling, SizeConditioning, StableDiffusion};
use crate::prompt::{PromptSyntax, TextOptions};
use crate::{Cancel, Error};

/// Why a job gave no images.
#[derive(Debug)]
pub enum JobError {
    /// The request cannot run with this model (422).
    Invalid(Vec<Detail>),
    /// The run failed (500).
    Failed(String),
    /// The server is stopping, or the client is gone (503).
    Unavailable(String),
}

/// What a job takes from the server's options.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// AUTOMATIC1111's clip skip.
    pub clip_skip: usize,
    /// Steps between previews; 0 for none.
    pub preview_every: usize,
    /// Where `save_images` requests put their folders.
    pub outputs: PathBuf,
}

/// The name of a request's prompt source in records, messages and saved folders.
fn source(req: &Txt2Img) -> &'static str {
    if req.image.is_some() {
        "img2img"
    } else {
        "txt2img"
    }
}

/// Runs `req` with `model` and the image seed `seed` (the first image's; image k gets seed + k,
/// as AUTOMATIC1111), reporting every batch event to `observe`.
pub fn run_txt2img(
    model: &StableDiffusion,
    req: &Txt2Img,
    seed: u64,
    settings: &JobSettings,
    cancel: &Cancel,
    observe: &mut dyn FnMut(&BatchEvent),
) -> Result<ImagesResponse, JobError> {
    let invalid = |e: &Error| JobError::Invalid(vec![setting_detail(e)]);
    let (scheduler, karras) = match req.sampler {
        Some(found) => found,
        None => match model.default_scheduler() {
            Ok(kind) => (kind, false),
            Err(e) => {
                return Err(JobError::Invalid(vec![Detail::field(
                    "sampler_name",
                    format!("{e}; give a sampler_name"),
                    "value_error",
                )]))
            }
        },
    };
    let (default_w, default_h) = model.default_size_for(req.image.as_deref());
    let sampling = Sampling {
        width: req.width.unwrap_or(default_w),
        height: req.height.unwrap_or(default_h),
        steps: req.steps,
        guidance: req.cfg_scale,
        scheduler,
        karras,
        rng: RngKind::default(),
        size_conditioning: SizeConditioning::default(),
        preview_every: (settings.preview_every > 0).then_some(settings.preview_every),
        text: TextOptions {
            syntax: PromptSyntax::A1111,
            clip_skip: settings.clip_skip,
        },
        image: req.image.clone(),
    };
    // The checks of every batch line, here with their typed errors so the answer names the
    // field; the batch's own plan runs the same ones again.
    let first = Job {
        index: 0,
        path: PathBuf::from(source(req)),
        line: 1,
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        sampling: sampling.clone(),
        seed,
        seed_from: SeedFrom::Line,
    };
    validate_job(model, &first).map_err(|e| invalid(&e))?;
    model
        .check_sampling(&sampling, req.batch_size)
        .map_err(|e| invalid(&e))?;

    let spec = LineSpec {
        prompt: req.prompt.clone(),
        negative_prompt: Some(req.negative_prompt.clone()),
        seed: Some(seed),
        batch_size: Some(req.batch_size),
        n_iter: Some(req.n_iter),
        ..LineSpec::default()
    };
    let file = PromptFile::in_memory(source(req), vec![spec]);
    let started = SystemTime::now();
    let (out_dir, access) = if req.save_images {
        (
            fresh_folder(&settings.outputs, source(req), started)
                .map_err(|e| JobError::Failed(e.to_string()))?,
            Access::Write,
        )
    } else {
        (PathBuf::new(), Access::Memory)
    };
    let config = BatchConfig {
        out_dir: out_dir.clone(),
        seed: Some(seed),
        new_seed: seed,
        repeat: 1,
        batch_size: req.batch_size,
        max_images: None,
        template: DEFAULT_TEMPLATE
            .parse()
            .map_err(|e: Error| JobError::Failed(e.to_string()))?,
        overwrite: false,
        wait: false,
        shard: None,
    };
    let prepared = Batch::prepare(
        model,
        config,
        &[file],
        &req.negative_prompt,
        sampling.clone(),
        access,
    )
    .map_err(|e| JobError::Failed(e.to_string()))?;
    if let Some(e) = prepared.line_errors().first() {
        return Err(JobError::Invalid(vec![Detail::body(
            e.message.clone(),
            "value_error",
        )]));
    }
    let planned: Vec<(String, String, u64)> = prepared
        .plan()
        .jobs
        .iter()
        .map(|j| (j.prompt.clone(), j.negative_prompt.clone(), j.seed))
        .collect();

    let mut images = Vec::new();
    let mut infotexts = Vec::new();
    let mut errors = Vec::new();
    let mut skipped = 0;
    let summary = prepared
        .run(cancel, &mut |event| {
            match &event {
                BatchEvent::Made { png, record } => {
                    images.push(png.to_vec());
                    infotexts.push(record.parameters.clone());
                }
                BatchEvent::Written { path, record } => match std::fs::read(path) {
                    Ok(png) => {
                        images.push(png);
                        infotexts.push(record.parameters.clone());
                    }
                    Err(e) => errors.push(format!("{}: {e}", path.display())),
                },
                BatchEvent::Failed {
                    error: Error::Skipped,
                    ..
                } => skipped += 1,
                BatchEvent::Failed { error, .. } => errors.push(error.to_string()),
                _ => {}
            }
            observe(&event);
        })
        .map_err(|e| JobError::Failed(e.to_string()))?;
    if images.is_empty() && !errors.is_empty() {
        errors.dedup();
        return Err(JobError::Failed(errors.join("; ")));
    }

    let engine = base64::engine::general_purpose::STANDARD;
    let mut parameters = req.parameters.clone();
    let sampler = sampler_name(scheduler, false);
    let schedule = if karras { "Karras" } else { "Automatic" };
    // What the request left to the model, as it was chosen (AUTOMATIC1111's defaults of 512
    // pixels and Euler are SD 1.x's; latent takes the model's own).
    for (key, given, value) in [
        ("width", req.width.is_some(), Value::from(sampling.width)),
        ("height", req.height.is_some(), Value::from(sampling.height)),
        (
            "sampler_name",
            req.sampler.is_some(),
            Value::from(sampler.clone()),
        ),
        ("scheduler", req.sampler.is_some(), Value::from(schedule)),
    ] {
        if !given {
            parameters.insert(key.into(), value);
        }
    }
    let mut ignored = req.ignored.clone();
    ignored.sort();
    let info = Info {
        prompt: req.prompt.clone(),
        all_prompts: planned.iter().map(|p| p.0.clone()).collect(),
        negative_prompt: req.negative_prompt.clone(),
        all_negative_prompts: planned.iter().map(|p| p.1.clone()).collect(),
        seed,
        all_seeds: planned.iter().map(|p| p.2).collect(),
        subseed: -1,
        all_subseeds: vec![-1; planned.len()],
        subseed_strength: 0.0,
        width: sampling.width,
        height: sampling.height,
        sampler_name: sampler,
        scheduler: schedule.into(),
        cfg_scale: sampling.guidance,
        steps: sampling.steps,
        batch_size: req.batch_size,
        restore_faces: false,
        face_restoration_model: None,
        sd_model_name: model.name().into(),
        sd_model_hash: None,
        sd_vae_name: model.vae_name().map(str::to_string),
        sd_vae_hash: None,
        seed_resize_from_w: -1,
        seed_resize_from_h: -1,
        denoising_strength: req.image.as_ref().map(|i| i.strength()),
        extra_generation_params: Default::default(),
        index_of_first_image: 0,
        infotexts,
        styles: Vec::new(),
        job_timestamp: timestamp(started),
        clip_skip: settings.clip_skip,
        is_using_inpainting_conditioning: model.is_inpainting_model()
            && req.image.as_ref().is_some_and(|i| i.mask().is_some()),
        version: format!("latent {}", env!("CARGO_PKG_VERSION")),
        ignored_fields: ignored,
        interrupted: summary.stop == Stop::Cancelled,
        skipped_images: skipped,
        saved_to: req.save_images.then(|| out_dir.display().to_string()),
    };
    Ok(ImagesResponse {
        images: if req.send_images {
            images.iter().map(|png| engine.encode(png)).collect()
        } else {
            Vec::new()
        },
        parameters,
        info: serde_json::to_string(&info).map_err(|e| JobError::Failed(e.to_string()))?,
    })
}

/// A folder under `outputs` no run has used: `KIND-YYYYMMDD-hhmmss[-N]` (KIND: txt2img or
/// img2img).
fn fresh_folder(outputs: &Path, kind: &str, at: SystemTime) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(outputs)?;
    let stamp = timestamp(at);
    let base = format!("{kind}-{}-{}", &stamp[..8], &stamp[8..]);
    for n in 0..10_000u32 {
        let name = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        let dir = outputs.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "{}: no free folder name for this second",
        outputs.display()
    )))
}

/// `YYYYMMDDhhmmss` in UTC, AUTOMATIC1111's `job_timestamp`.
pub fn timestamp(at: SystemTime) -> String {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(timestamp(at(0)), "19700101000000");
        // 2024-02-29 23:59:59 UTC, a leap day.
        assert_eq!(timestamp(at(1_709_251_199)), "20240229235959");
        assert_eq!(timestamp(at(1_709_251_200)), "20240301000000");
    }
}
