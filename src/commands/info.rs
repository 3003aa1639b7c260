//! `latent info`: print the parameters stored in PNG files, or what a single-file checkpoint
//! (`.safetensors`) is.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use latent::output;

/// What `path` holds: a PNG's parameters, or for a `.safetensors` file what checkpoint it is.
fn read(path: &Path) -> latent::Result<Option<String>> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        let ckpt = latent::model::single_file::Checkpoint::open(path)?;
        return Ok(Some(ckpt.describe().join("\n")));
    }
    output::read_png_parameters(path)
}

/// `latent info FILE...`: every file is reported, one that cannot be read or holds no
/// parameters with one line on stderr; the exit status is non-zero at the end if any failed.
pub fn info(files: &[PathBuf]) -> Result<()> {
    if let [only] = files {
        return match read(only)? {
            Some(text) => {
                println!("{text}");
                Ok(())
            }
            None => bail!("{}: no generation parameters in this PNG", only.display()),
        };
    }
    let mut failed = 0;
    for (i, f) in files.iter().enumerate() {
        let parameters = read(f);
        if parameters.is_ok() {
            if i > 0 {
                println!();
            }
            println!("{}:", f.display());
        }
        match parameters {
            Ok(Some(text)) => println!("{text}"),
            Ok(None) => {
                eprintln!("{}: no generation parameters in this PNG", f.display());
                failed += 1;
            }
            Err(e) => {
                eprintln!("error: {}", crate::cli::describe(&e));
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} files had no readable parameters",
            files.len()
        );
    }
    Ok(())
}
