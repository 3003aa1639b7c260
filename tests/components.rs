//! Parity of single components (UNet forward, VAE decode) with diffusers, on the tiny models.
//! Goldens: tests/fixtures/components, made by tools/make_component_fixtures.py.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use latent::model::{UNet, UNetConfig, VaeConfig, VaeDecoder, Weights};

mod common;
use common::max_abs_diff;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn goldens(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("components/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn check_unet(name: &str) {
    let dir = fixtures().join(format!("tiny-{name}"));
    let cfg = UNetConfig::from_file(&dir.join("unet/config.json")).unwrap();
    let w = Weights::open(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let unet = UNet::load(&w, &cfg).unwrap();
    let g = goldens(name);
    for tag in ["square", "odd"] {
        let t = g[&format!("unet_{tag}_timestep")].to_vec1::<f64>().unwrap()[0];
        let out = unet
            .forward(
                &g[&format!("unet_{tag}_sample")],
                t,
                &g[&format!("unet_{tag}_context")],
            )
            .unwrap();
        let d = max_abs_diff(&out, &g[&format!("unet_{tag}_out")]);
        // f32 on both sides; differences are summation order only.
        eprintln!("{name} unet {tag}: max abs diff {d:.3e}");
        assert!(d < 1e-4, "{name} unet {tag}: max abs diff {d}");
    }
}

fn check_vae(name: &str) {
    let dir = fixtures().join(format!("tiny-{name}"));
    let cfg = VaeConfig::from_file(&dir.join("vae/config.json")).unwrap();
    let w = Weights::open(
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let vae = VaeDecoder::load(&w, &cfg).unwrap();
    let g = goldens(name);
    let image = vae.decode(&g["vae_latents"]).unwrap();
    let d = max_abs_diff(&image, &g["vae_image"]);
    eprintln!("{name} vae: max abs diff {d:.3e}");
    assert!(d < 1e-4, "{name} vae: max abs diff {d}");
}

#[test]
fn unet_sd1_matches_diffusers() {
    check_unet("sd1");
}

#[test]
fn unet_sd2_matches_diffusers() {
    check_unet("sd2");
}

#[test]
fn vae_sd1_matches_diffusers() {
    check_vae("sd1");
}

#[test]
fn vae_sd2_old_attention_names_match_diffusers() {
    check_vae("sd2");
}
