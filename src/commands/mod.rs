//! What each subcommand does: load the model, call the library's stages, write files, report.
//! Helpers shared by the subcommands live here; each subcommand has its own file.
mod batch;
mod bench;
mod generate;
mod info;
mod serve;
mod walk;

use anyhow::{bail, Context, Result};
use latent::lora::LoraSpec;
use latent::model::single_file::ModelType;
use latent::model::ModelSource;
use latent::pipeline::{LoadOptions, LoraSettings, Residency, Sampling, StableDiffusion};
use latent::Cancel;

pub use batch::batch;
pub use bench::bench;
pub use generate::generate;
pub use info::info;
pub use serve::serve;
pub use walk::walk;

use crate::cli::{ModelArgs, SamplingArgs};
use crate::progress::Progress;

/// Environment variable naming the default model.
const MODEL_ENV: &str = "LATENT_MODEL";

/// The model to use: `--model`, else `$LATENT_MODEL`, else the bundled demo model (compiled
/// into the binary and extracted once to the cache folder, see `latent::demo`).
fn model_source(args: &ModelArgs) -> Result<ModelSource> {
    let spec = model_spec(args)?;
    Ok(ModelSource::parse(&spec, args.revision.as_deref())?)
}

/// What names the model of `args`: `--model`, else `$LATENT_MODEL`, else the demo model's
/// folder (extracted first).
fn model_spec(args: &ModelArgs) -> Result<String> {
    Ok(
        match (
            &args.model,
            std::env::var(MODEL_ENV).ok().filter(|s| !s.is_empty()),
        ) {
            (Some(m), _) => m.clone(),
            (None, Some(env)) => env,
            (None, None) => {
                if args.revision.is_some() {
                    bail!("--revision only applies to hub models; the bundled demo model has none");
                }
                latent::demo::model_dir()
                    .context("cannot set up the bundled demo model (pass --model to use another)")?
                    .display()
                    .to_string()
            }
        },
    )
}

/// Loads the model named by `args`, reporting progress.
/// Opens the model of `args`; with [`Residency::Staged`] its components load as their stages
/// start, one at a time (one-shot commands), else all now (commands that make many images).
pub fn load_model(
    args: &ModelArgs,
    residency: Residency,
    progress: &mut Progress,
) -> Result<StableDiffusion> {
    let source = model_source(args)?;
    let device = args.device.open()?;
    let dtype = args.dtype.resolve(&device)?;
    let files = source.open()?;
    let vae = match &args.vae {
        // A bad spec names the setting itself; the files it opens get the flag as context.
        Some(spec) => Some(
            ModelSource::parse_component(spec)?
                .open()
                .with_context(|| format!("--vae {spec}"))?,
        ),
        None => None,
    };
    let model_config = match &args.model_config {
        Some(spec) => Some(
            ModelSource::parse(spec, None)?
                .open()
                .with_context(|| format!("--model-config {spec}"))?,
        ),
        None => None,
    };
    let model_type = args
        .model_type
        .as_deref()
        .map(str::parse::<ModelType>)
        .transpose()?;
    let lora = lora_settings(args)?;
    let options = LoadOptions {
        residency,
        vae: vae.as_ref(),
        lora: lora.clone(),
        model_type,
        model_config: model_config.as_ref(),
    };
    let mut model =
        StableDiffusion::load_opts(&files, &device, dtype, &options, &mut |e| progress.event(e))?;
    if let Some(detected) = model.detected() {
        progress.println(&format!("{}: {detected}", model.name()));
    }
    if !lora.base.is_empty() {
        let names: Vec<String> = lora
            .base
            .iter()
            .map(|l| format!("{} ({})", l.name(), l.weight))
            .collect();
        progress.println(&format!("LoRA: {}", names.join(", ")));
    }
    if let Some(dir) = &args.embeddings {
        let names = model.load_embeddings(dir)?;
        progress.println(&format!(
            "embeddings from {}: {}",
            dir.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ));
    }
    Ok(model)
}

/// The LoRA folder (`--lora-dir`, else `$LATENT_LORA_DIR`) and the `--lora` files.
fn lora_settings(args: &ModelArgs) -> Result<LoraSettings> {
    let dir = args.lora_dir.clone();
    let base = args
        .lora
        .iter()
        .map(|spec| LoraSpec::parse(spec, dir.as_deref()))
        .collect::<latent::Result<Vec<_>>>()?;
    Ok(LoraSettings { dir, base })
}

/// Exit status of a run abandoned by a second Ctrl-C (128 + SIGINT, as shells report it).
const ABANDON_EXIT: i32 = 130;

/// Ctrl-C for a run, through the library's one cancel flag: the first press asks the run to
/// stop after the batch in flight; the second quits at once, but only between writes (it takes
/// [`Cancel::writing`] first), so no output is left without its record. A handler that cannot
/// be installed only warns.
pub fn stop_on_ctrl_c(cancel: &Cancel, progress: &Progress) {
    let flag = cancel.clone();
    let installed = ctrlc::set_handler(move || {
        if flag.request() == 1 {
            eprintln!(
                "\ninterrupted: finishing the current batch, then stopping (Ctrl-C again to quit \
                 now; run the same command again to resume)"
            );
        } else {
            let _writing = flag.writing();
            eprintln!(
                "\ninterrupted again: quitting; every finished file is complete and recorded, \
                 run the same command again to resume"
            );
            std::process::exit(ABANDON_EXIT);
        }
    });
    if let Err(e) = installed {
        progress.println(&format!(
            "warning: cannot catch Ctrl-C ({e}); interrupting may lose the batch in flight"
        ));
    }
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

/// The library's sampling settings from the flags, with the model's defaults for size and
/// scheduler.
pub fn sampling_for(model: &StableDiffusion, s: &SamplingArgs) -> Result<Sampling> {
    let size = model.default_size();
    let scheduler = match s.scheduler {
        Some(k) => k,
        None => model.default_scheduler()?,
    };
    Ok(Sampling {
        width: s.width.unwrap_or(size),
        height: s.height.unwrap_or(size),
        steps: s.steps,
        guidance: s.guidance,
        scheduler,
        karras: s.karras,
        rng: s.rng,
        size_conditioning: s.size_conditioning(),
        preview_every: None,
        text: s.text_options(),
        image: None,
    })
}
