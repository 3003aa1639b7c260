#!/usr/bin/env python3
"""Builds a full-size SD-Turbo (stabilityai/sd-turbo) with random weights, for benchmarks.

SD-Turbo is the SD 2.1-base architecture (UNet 865.9M, OpenCLIP-H text encoder 340.4M as a
23-layer CLIPTextModel with exact gelu, VAE 83.7M parameters) distilled for 1-4 steps without
guidance. Same configs, key for key, and folder layout as the hub repo; scheduler as its own file
(EulerDiscreteScheduler, timestep_spacing "trailing"); tokenizer = the real CLIP vocabulary padding
with "!" (tests/fixtures/tiny-sd2). Random float16 weights, streamed as in make_random_sdxl.py.

    HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/make_random_turbo.py OUT_DIR [--vae-tiny TINY_DIR]

--vae-tiny also writes a random-weight AutoencoderTiny with TAESD's real config (madebyollin/taesd
layout: config.json + diffusion_pytorch_model.safetensors at the root); --only-vae-tiny writes just
that.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_sdxl import (  # noqa: E402
    REPO,
    check_pipeline,
    clip_text_config,
    copy_tokenizer,
    write_diffusers_model,
    write_json,
    write_text_encoder,
    write_tiny_vae,
)

# ---- the real configs of stabilityai/sd-turbo -------------------------------------------------------

TURBO_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.24.0.dev0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

TURBO_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None,
    "attention_head_dim": [5, 10, 20, 20],
    "attention_type": "default",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 1024,
    "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

TURBO_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "sigma_max": None,
    "sigma_min": None,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "timestep_type": "discrete",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TURBO_TEXT_ENCODER = clip_text_config("CLIPTextModel", 1024, 23, 16, 4096, "gelu", 512, "4.35.2")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=str(REPO.parent / "sd-turbo-random"))
    ap.add_argument("--vae-tiny", metavar="DIR", help="also write a random TAESD (AutoencoderTiny) here")
    ap.add_argument("--only-vae-tiny", action="store_true", help="write only the --vae-tiny folder")
    ap.add_argument("--no-check", action="store_true", help="skip loading the result back with diffusers")
    a = ap.parse_args()

    if a.vae_tiny:
        write_tiny_vae(Path(a.vae_tiny), 30, "madebyollin/taesd")
    if a.only_vae_tiny:
        return

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_diffusers_model(out / "unet", UNet2DConditionModel, TURBO_UNET, 21)
    write_diffusers_model(out / "vae", AutoencoderKL, TURBO_VAE, 22)
    write_text_encoder(out / "text_encoder", TURBO_TEXT_ENCODER, 23)
    EulerDiscreteScheduler.from_config(TURBO_SCHEDULER)  # the file must build
    write_json(out / "scheduler" / "scheduler_config.json", TURBO_SCHEDULER)
    copy_tokenizer("tiny-sd2", out / "tokenizer")
    write_json(out / "model_index.json", TURBO_MODEL_INDEX)
    if not a.no_check:
        check_pipeline(out)
    print("wrote", out)


if __name__ == "__main__":
    main()
