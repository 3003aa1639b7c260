//! `latent serve`: the flags become the server's settings and a model loader; the library's
//! server (`latent::serve`) does the rest until Ctrl-C.
use anyhow::Result;
use latent::pipeline::{Residency, StableDiffusion};
use latent::serve::{self, ServeConfig};

use super::{load_model, model_spec};
use crate::cli::ServeArgs;
use crate::progress::Progress;

/// `latent serve`.
pub fn serve(args: ServeArgs) -> Result<()> {
    let credentials = match &args.api_auth {
        Some(text) => serve::parse_credentials(text)?,
        None => Vec::new(),
    };
    if let Some(dir) = &args.models_dir {
        if !dir.is_dir() {
            anyhow::bail!("--models-dir {}: not a folder", dir.display());
        }
    }
    let start_spec = model_spec(&args.model)?;
    let model_args = args.model.clone();
    let first = start_spec.clone();
    // Every model loads as the command line loads one (device, precision, --vae,
    // --embeddings); --revision, --model-type and --model-config belong to the starting model
    // only (a single file in the models folder says what it is, or has an AUTOMATIC1111-style
    // .yaml beside it).
    let loader = Box::new(move |spec: &str| -> latent::Result<StableDiffusion> {
        let mut a = model_args.clone();
        if spec != first {
            a.revision = None;
            a.model_type = None;
            a.model_config = None;
        }
        a.model = Some(spec.to_string());
        let mut progress = Progress::new(true);
        load_model(&a, Residency::Resident, &mut progress)
            .map_err(|e| latent::Error::InvalidInput(format!("{e:#}")))
    });
    let config = ServeConfig {
        listen: args.listen,
        model_spec: start_spec,
        models_dir: args.models_dir.clone(),
        credentials,
        max_body: args.max_body,
        queue: args.queue as usize,
        outputs: args.output.clone(),
    };
    eprintln!("latent serve: loading {}", config.model_spec);
    serve::run(config, loader, &|address| {
        eprintln!(
            "latent serve: listening on http://{address}/ (API at http://{address}/sdapi/v1; Ctrl-C \
             to stop)"
        )
    })?;
    Ok(())
}
