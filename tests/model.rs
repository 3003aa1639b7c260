//! Model discovery and configs: hub cache layout offline, fp16 variant choice, pickle refusal,
//! and the real SD 1.5 / SD 2.1 hub config files (written out here as the hub has them).
use std::path::Path;

use latent::model::{ConfigFile, ModelSource, UNetConfig, VaeConfig};

mod common;
use common::{copy_dir, fixtures};

#[test]
fn hub_ids_resolve_from_the_standard_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--test-org--tiny-sd1");
    copy_dir(
        &fixtures().join("tiny-sd1"),
        &repo.join("snapshots/0123abcd"),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let out = cache.path().join("cat.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_latent"))
        .args([
            "generate",
            "a photo of a cat",
            "--model",
            "test-org/tiny-sd1",
            "--steps",
            "2",
            "--quiet",
            "-o",
        ])
        .arg(&out)
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = latent::output::read_png_parameters(&out).unwrap().unwrap();
    assert!(text.contains("Model: test-org/tiny-sd1"), "{text}");

    // A revision the cache does not hold is a clear error naming the repo and file.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_latent"))
        .args([
            "generate",
            "a cat",
            "--model",
            "test-org/tiny-sd1",
            "--revision",
            "v2",
            "--quiet",
        ])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("test-org/tiny-sd1/model_index.json") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

#[test]
fn fp16_variant_is_preferred_only_in_f16_and_pickles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir_all(m.join("unet")).unwrap();
    std::fs::write(m.join("unet/diffusion_pytorch_model.safetensors"), b"x").unwrap();
    std::fs::write(
        m.join("unet/diffusion_pytorch_model.fp16.safetensors"),
        b"x",
    )
    .unwrap();
    std::fs::create_dir_all(m.join("vae")).unwrap();
    std::fs::write(m.join("vae/diffusion_pytorch_model.bin"), b"x").unwrap();
    let files = ModelSource::parse(&m.display().to_string(), None)
        .unwrap()
        .open()
        .unwrap();
    let f16 = files
        .weights("unet", "diffusion_pytorch_model", true)
        .unwrap();
    assert!(f16.ends_with("unet/diffusion_pytorch_model.fp16.safetensors"));
    let f32 = files
        .weights("unet", "diffusion_pytorch_model", false)
        .unwrap();
    assert!(f32.ends_with("unet/diffusion_pytorch_model.safetensors"));
    let err = files
        .weights("vae", "diffusion_pytorch_model", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pickle") && err.contains("vae/diffusion_pytorch_model.bin"),
        "{err}"
    );
    let err = files
        .weights("text_encoder", "model", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text_encoder/model.safetensors") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn model_spec_errors_are_clear() {
    let err = ModelSource::parse("not a repo id at all", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a repo id at all"), "{err}");
    let dir = fixtures().join("tiny-sd1");
    let err = ModelSource::parse(&dir.display().to_string(), Some("main"))
        .unwrap_err()
        .to_string();
    // The library names the setting; the command line maps it to `--revision`.
    assert!(
        err.contains("revision main: only applies to hub models") && !err.contains("--"),
        "{err}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// stable-diffusion-v1-5's unet/config.json as published (diffusers 0.6.0 era: few keys).
const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// stable-diffusion-2-1's unet/config.json as published.
const SD21_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
  "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
  "sample_size": 96, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "use_linear_projection": true, "upcast_attention": true
}"#;

/// stable-diffusion-v1-5's vae/config.json as published (no scaling_factor key).
const SD15_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

/// stable-diffusion-xl-base-1.0's unet/config.json as published.
const SDXL_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
  "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
  "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280], "center_input_sample": false,
  "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
  "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
  "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
  "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
  "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
  "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
  "time_embedding_act_fn": null, "time_embedding_dim": null,
  "time_embedding_type": "positional", "timestep_post_act": null,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": null, "use_linear_projection": true
}"#;

#[test]
fn real_sdxl_and_lcm_configs_parse() {
    let dir = tempfile::tempdir().unwrap();
    let xl = UNetConfig::from_file(&write(dir.path(), "xl.json", SDXL_UNET)).unwrap();
    assert_eq!(xl.sample_size, 128);
    assert_eq!(xl.cross_attention_dim, 2048);
    let tt = xl.text_time.as_ref().unwrap();
    assert_eq!(
        (tt.time_embed_dim, tt.input_dim, tt.pooled_dim()),
        (256, 2816, 1280)
    );
    assert_eq!(
        xl.blocks
            .iter()
            .map(|b| (b.heads, b.transformer_layers[0], b.cross_attention))
            .collect::<Vec<_>>(),
        [(5, 1, false), (10, 2, true), (20, 10, true)]
    );
    // Up blocks mirror the depths (3 layers each), the mid block takes the last block's.
    assert_eq!(xl.blocks[2].up_transformer_layers, [10, 10, 10]);
    assert_eq!(
        xl.mid_block,
        latent::model::config::MidBlockKind::CrossAttn {
            transformer_layers: 10
        }
    );
    // Asymmetric UNets list depths per layer and must give the up blocks' own.
    let asym = SDXL_UNET.replace(
        "\"transformer_layers_per_block\": [1, 2, 10]",
        "\"transformer_layers_per_block\": [1, [1, 2], [3, 4]], \
         \"reverse_transformer_layers_per_block\": [[5, 6, 7], [1, 1, 2], 1]",
    );
    let asym = UNetConfig::from_file(&write(dir.path(), "asym.json", &asym)).unwrap();
    assert_eq!(asym.blocks[1].transformer_layers, [1, 2]);
    assert_eq!(asym.blocks[2].up_transformer_layers, [5, 6, 7]);
    assert_eq!(asym.blocks[0].up_transformer_layers, [1, 1, 1]);
    assert_eq!(
        asym.mid_block,
        latent::model::config::MidBlockKind::CrossAttn {
            transformer_layers: 3
        }
    );
    let no_reverse = SDXL_UNET.replace(
        "\"transformer_layers_per_block\": [1, 2, 10]",
        "\"transformer_layers_per_block\": [1, [1, 2], [3, 4]]",
    );
    let err = UNetConfig::from_file(&write(dir.path(), "nr.json", &no_reverse))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reverse_transformer_layers_per_block"),
        "{err}"
    );
    let plain_mid = SDXL_UNET.replace("\"UNetMidBlock2DCrossAttn\"", "\"UNetMidBlock2D\"");
    let plain_mid = UNetConfig::from_file(&write(dir.path(), "pm.json", &plain_mid)).unwrap();
    assert_eq!(
        plain_mid.mid_block,
        latent::model::config::MidBlockKind::Resnet
    );
    assert_eq!(xl.time_cond_proj_dim, None);
    // LCM-SDXL: the same UNet with a guidance embedding input.
    let lcm = SDXL_UNET.replace(
        "\"time_cond_proj_dim\": null",
        "\"time_cond_proj_dim\": 256",
    );
    let lcm = UNetConfig::from_file(&write(dir.path(), "lcm.json", &lcm)).unwrap();
    assert_eq!(lcm.time_cond_proj_dim, Some(256));
}

#[test]
fn real_hub_configs_parse_to_the_real_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let sd15 = UNetConfig::from_file(&write(dir.path(), "sd15.json", SD15_UNET)).unwrap();
    assert_eq!(sd15.sample_size, 64);
    assert_eq!(sd15.cross_attention_dim, 768);
    assert_eq!(
        sd15.blocks.iter().map(|b| b.heads).collect::<Vec<_>>(),
        [8, 8, 8, 8]
    );
    assert_eq!(
        sd15.blocks
            .iter()
            .map(|b| b.cross_attention)
            .collect::<Vec<_>>(),
        [true, true, true, false]
    );
    assert!(!sd15.use_linear_projection);

    let sd21 = UNetConfig::from_file(&write(dir.path(), "sd21.json", SD21_UNET)).unwrap();
    assert_eq!(sd21.sample_size, 96);
    assert_eq!(
        sd21.blocks.iter().map(|b| b.heads).collect::<Vec<_>>(),
        [5, 10, 20, 20]
    );
    assert!(sd21.use_linear_projection && sd21.upcast_attention);

    let vae = VaeConfig::from_file(&write(dir.path(), "vae.json", SD15_VAE)).unwrap();
    assert_eq!(vae.scale_factor(), 8);
    assert_eq!(vae.scaling_factor, 0.18215);
}

#[test]
fn unsupported_or_broken_configs_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    // text_time needs its sizes; other added embeddings (Kandinsky's) are not implemented.
    let sdxl = SD15_UNET.replace(
        "\"act_fn\"",
        "\"addition_embed_type\": \"text_time\", \"act_fn\"",
    );
    let err = UNetConfig::from_file(&write(dir.path(), "xl.json", &sdxl))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("xl.json") && err.contains("addition_time_embed_dim"),
        "{err}"
    );
    let kandinsky = SD15_UNET.replace(
        "\"act_fn\"",
        "\"addition_embed_type\": \"text_image\", \"act_fn\"",
    );
    let err = UNetConfig::from_file(&write(dir.path(), "k.json", &kandinsky))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("k.json") && err.contains("addition_embed_type") && err.contains("text_image"),
        "{err}"
    );
    let heads = SD15_UNET.replace("\"act_fn\"", "\"num_attention_heads\": 8, \"act_fn\"");
    let err = UNetConfig::from_file(&write(dir.path(), "h.json", &heads))
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_attention_heads"), "{err}");

    let unknown = SD15_UNET.replace("\"act_fn\"", "\"brand_new_knob\": 3, \"act_fn\"");
    let err = UNetConfig::from_file(&write(dir.path(), "new.json", &unknown))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("new.json") && err.contains("brand_new_knob") && err.contains("unknown"),
        "{err}"
    );

    let missing = SD15_UNET.replace("\"sample_size\": 64,", "");
    let err = UNetConfig::from_file(&write(dir.path(), "ms.json", &missing))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ms.json") && err.contains("sample_size") && err.contains("missing"),
        "{err}"
    );

    let bad = SD15_UNET.replace("\"norm_num_groups\": 32", "\"norm_num_groups\": 30");
    let err = UNetConfig::from_file(&write(dir.path(), "g.json", &bad))
        .unwrap_err()
        .to_string();
    assert!(err.contains("norm_num_groups"), "{err}");

    let err = ConfigFile::open(&write(dir.path(), "broken.json", "{ not json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.json") && err.contains("invalid JSON"),
        "{err}"
    );
}
