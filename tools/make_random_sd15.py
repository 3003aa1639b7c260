#!/usr/bin/env python3
"""Builds a full-size Stable Diffusion 1.5 checkpoint with random weights, for benchmarks.

Same architecture and sizes as the real SD 1.5 (UNet 859.5M, VAE 83.7M, CLIP ViT-L text 123.1M
parameters), in the exact diffusers layout, so compute and memory equal the real model's. The
tokenizer folder is copied from tests/fixtures/tiny-sd1 (the real CLIP vocabulary). Weights are
drawn from a seeded generator; norms are perturbed so they are not exactly 1/0.

    HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/make_random_sd15.py OUT_DIR
"""
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def reinit_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln" in name):
                if name.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    reinit_(unet, 1)
    unet.save_pretrained(out / "unet")
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    reinit_(vae, 2)
    vae.save_pretrained(out / "vae")
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    text = CLIPTextModel(cfg)
    reinit_(text, 3)
    (out / "text_encoder").mkdir(exist_ok=True)
    cfg.save_pretrained(out / "text_encoder")
    sd = {k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous() for k, v in text.state_dict().items()}
    save_file(sd, out / "text_encoder" / "model.safetensors")
    sched = PNDMScheduler.from_config({
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    })
    sched.save_pretrained(out / "scheduler")
    shutil.copytree(REPO / "tests/fixtures/tiny-sd1/tokenizer", out / "tokenizer", dirs_exist_ok=True)
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../sd15-random")
