#!/usr/bin/env python3
"""Builds the tiny random-weight TAESD fixture (diffusers' AutoencoderTiny) and its decode goldens.

Writes, under tests/fixtures/ (or --out):
  tiny-taesd/     config.json + diffusion_pytorch_model.safetensors, the layout of the
                  madebyollin/taesd hub repo: the real architecture (num_encoder_blocks (1, 3, 3, 3),
                  num_decoder_blocks (3, 3, 3, 1), 8x upscaling, 4 latent channels, relu) at width 16
                  instead of 64. Encoder included, as in the hub file.
  golden-taesd/   taesd.safetensors: per case the latents given to the decoder, diffusers' decode
                  output and the pipeline-style uint8 image; README.md says how they were made.

Every weight is drawn from a seeded generator, rounded to float16 and stored as float16; the goldens
are computed in float32 from exactly those rounded values, by a model loaded back from the folder.

Run offline, with a Python (PYTHON, default python3) that has the packages listed in the fixtures README:
  HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/make_tiny_taesd.py
"""

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import safetensors  # noqa: E402
from diffusers import AutoencoderTiny  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 4242

# The real TAESD config (madebyollin/taesd) except for the widths.
TAESD_KWARGS = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(16, 16, 16, 16),
    decoder_block_out_channels=(16, 16, 16, 16),
    act_fn="relu",
    upsample_fn="nearest",
    latent_channels=4,
    upsampling_scaling_factor=2,
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
    latent_magnitude=3,
    latent_shift=0.5,
    scaling_factor=1.0,
    shift_factor=0.0,
)

# name -> (latent shape, standard deviation, seed). Latents as the UNet loop leaves them (already
# multiplied by SD's 0.18215): about unit variance. "wide" is larger so that more values reach the
# decoder's tanh clamp, and has an odd, non-square size.
CASES = {
    "square": ((2, 4, 8, 8), 1.0, 1),
    "wide": ((1, 4, 6, 10), 2.0, 2),
}


def reinit_(model, seed):
    """Re-initialises every parameter from a seeded generator, then rounds it to float16.

    The rule of tools/make_tiny_models.py for convolutions (weights ~ N(0, 1/fan_in), biases
    ~ N(0, 0.05^2)), adapted to a network without normalisation so that the image stays in range:
    the last conv of every residual branch (`conv.4`) is scaled by 0.3 (ten residual blocks would
    otherwise grow the activations tenfold), and the image conv (the decoder's last layer) has its
    weights scaled by 0.3 and 0.5 added to its bias, since TAESD writes images in [0, 1]. The
    encoder's last conv follows the plain rule.
    """
    g = torch.Generator().manual_seed(seed)
    image_conv = f"decoder.layers.{len(model.decoder.layers) - 1}."
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("weight") and p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                value = noise / fan_in**0.5
                if name.endswith("conv.4.weight") or name.startswith(image_conv):
                    value = 0.3 * value
            else:
                value = 0.05 * noise
                if name.startswith(image_conv):
                    value = value + 0.5
            p.copy_(value.to(torch.float16).to(torch.float32))
    return model


def half_state_dict(model):
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


def build(root):
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    vae = reinit_(AutoencoderTiny(**TAESD_KWARGS), SEED)
    vae.save_config(root)
    save_file(half_state_dict(vae), root / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    loaded = AutoencoderTiny.from_pretrained(root, torch_dtype=torch.float32).eval()
    # The folder loads back into exactly the rounded weights.
    got = loaded.state_dict()
    for k, v in vae.state_dict().items():
        assert got[k].dtype == torch.float32, (k, got[k].dtype)
        assert torch.equal(got[k], v), f"{k} differs after reload"
    return loaded


def goldens(vae, out):
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    processor = VaeImageProcessor(vae_scale_factor=8)
    tensors, stats = {}, {}
    for name, (shape, std, seed) in CASES.items():
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(shape, generator=g, dtype=torch.float32) * std
        latents = latents.to(torch.float16).to(torch.float32)
        with torch.no_grad():
            # What diffusers' pipelines do with output_type != "latent".
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        np_image = processor.postprocess(image, output_type="np")
        image_u8 = (np_image * 255).round().astype("uint8")
        assert torch.isfinite(image).all()
        tensors[f"{name}_latents"] = latents.contiguous()
        tensors[f"{name}_image"] = image.to(torch.float32).contiguous()
        tensors[f"{name}_image_u8"] = torch.from_numpy(image_u8).contiguous()
        stats[name] = {
            "image_min": float(image.min()),
            "image_max": float(image.max()),
            "clipped_fraction": float(((image < -1) | (image > 1)).float().mean()),
        }
        print(f"  {name}: latents {tuple(shape)} x{std}, image {tuple(image.shape)}, {stats[name]}")
    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    meta = {"generated_by": "tools/make_tiny_taesd.py", "versions": json.dumps(versions)}
    save_file(tensors, out / "taesd.safetensors", meta)
    return versions, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    print(f"building {args.out / 'tiny-taesd'}")
    vae = build(args.out / "tiny-taesd")
    print("goldens")
    versions, stats = goldens(vae, args.out / "golden-taesd")
    print("versions:", json.dumps(versions))
    print("stats:", json.dumps(stats))
    total = sum(
        f.stat().st_size
        for d in ("tiny-taesd", "golden-taesd")
        for f in (args.out / d).rglob("*")
        if f.is_file()
    )
    print(f"done: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
