//! Rendering a batch of items through the pipeline's stages, and timing one batch shape for
//! `--check`'s estimate.
use std::time::{Duration, Instant};

use crate::pipeline::{
    Event, GeneratedImage, PromptEmbeddings, Sampling, StableDiffusion, Timings,
};
use crate::schedulers::SchedulerKind;
use crate::{Cancel, Error, Result};

use super::group::same_group;
use super::plan::Job;

/// Stages 1 to 6 for one batch of jobs that share their sampling settings and LoRAs
/// ([`same_group`]):
/// encodes each distinct (prompt, negative prompt) once, stacks one embedding row per image,
/// and runs the pipeline's `render_batch` with one seed per image.
///
/// Each image is what the same job makes alone, up to float summation order (see
/// `tests/batch.rs`). `first_image` only labels progress events; stage times are added to
/// `timings`.
pub fn render_jobs(
    model: &StableDiffusion,
    jobs: &[&Job],
    first_image: usize,
    timings: &mut Timings,
    cancel: &Cancel,
    on_event: &mut dyn FnMut(Event),
) -> Result<Vec<GeneratedImage>> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    let s = &first.sampling;
    if let Some(odd) = jobs.iter().find(|j| !same_group(j, first)) {
        return Err(Error::InvalidInput(format!(
            "items {} and {} have different settings and cannot share a batch",
            first.index, odd.index
        )));
    }
    let start = Instant::now();
    let mut encoded: Vec<(&str, &str, PromptEmbeddings)> = Vec::new();
    let mut rows = Vec::with_capacity(jobs.len());
    for job in jobs {
        let found = encoded
            .iter()
            .position(|(p, n, _)| *p == job.prompt && *n == job.negative_prompt);
        let at = match found {
            Some(at) => at,
            None => {
                let e = model.encode_prompt_with(
                    &job.prompt,
                    &job.negative_prompt,
                    s.guidance,
                    &s.text,
                    s.steps,
                    on_event,
                )?;
                encoded.push((&job.prompt, &job.negative_prompt, e));
                encoded.len() - 1
            }
        };
        rows.push(at);
    }
    // One prompt for the whole batch: a single row, repeated by the pipeline like `generate`.
    let embeddings = if encoded.len() == 1 {
        encoded[0].2.clone()
    } else {
        let per_image: Vec<PromptEmbeddings> = rows.iter().map(|&r| encoded[r].2.clone()).collect();
        PromptEmbeddings::stack(&per_image)?
    };
    timings.text_encode += start.elapsed();
    let seeds: Vec<u64> = jobs.iter().map(|j| j.seed).collect();
    model.render_batch(
        &embeddings,
        &seeds,
        None,
        s,
        first_image,
        timings,
        cancel,
        on_event,
    )
}

/// Measured cost of one batch shape, for `--check`'s estimate.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Seconds per denoising step (one UNet call, CFG doubling included).
    pub step_s: f64,
    /// Seconds to decode the batch.
    pub decode_s: f64,
    /// Seconds to encode one prompt (and negative prompt).
    pub text_encode_s: f64,
}

/// Times one denoising step and one decode of a batch of `batch` images with `s`'s size and
/// guidance (a throwaway image from an empty prompt; nothing is written). The first call on a
/// device includes its warm-up, so the estimate errs on the long side.
pub fn probe(model: &StableDiffusion, s: &Sampling, batch: usize) -> Result<Probe> {
    let mut quiet = |_: Event| {};
    let start = Instant::now();
    let embeddings = model.encode_prompt("", "", s.guidance, &mut quiet)?;
    let text_encode_s = start.elapsed().as_secs_f64();
    let one_step = Sampling {
        steps: 1,
        scheduler: SchedulerKind::Ddim,
        karras: false,
        ..s.clone()
    };
    let mut timings = Timings::default();
    let seeds: Vec<u64> = (0..batch.max(1) as u64).collect();
    model.render_batch(
        &embeddings,
        &seeds,
        None,
        &one_step,
        0,
        &mut timings,
        &Cancel::new(),
        &mut quiet,
    )?;
    Ok(Probe {
        step_s: timings.seconds_per_step(),
        decode_s: timings.decode.as_secs_f64(),
        text_encode_s,
    })
}

/// Estimated wall time of a group's batches from a [`Probe`] of its batch shape: steps x step
/// time + decode per batch, plus one prompt encoding per item. `scheduler_steps` is the
/// scheduler's loop length (PNDM runs one more than asked).
pub fn estimate(probe: &Probe, scheduler_steps: usize, batches: usize, items: usize) -> Duration {
    let secs = batches as f64 * (scheduler_steps as f64 * probe.step_s + probe.decode_s)
        + items as f64 * probe.text_encode_s;
    Duration::from_secs_f64(secs.max(0.0))
}
