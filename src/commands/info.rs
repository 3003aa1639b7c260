//! `latent info`: print the parameters stored in PNG files.
use std::path::PathBuf;

use anyhow::{bail, Result};
use latent::output;

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
