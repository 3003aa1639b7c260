"""Golden outputs of single model components (UNet forward, VAE decode) from diffusers.

Reads the tiny models in tests/fixtures/tiny-sd{1,2} (made by tools/make_tiny_models.py) and
writes tests/fixtures/components/{sd1,sd2}.safetensors. Run from the repo root:

    HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/make_component_fixtures.py
"""
import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def main():
    torch.manual_seed(0)
    for name in ("sd1", "sd2"):
        folder = os.path.join(ROOT, f"tiny-{name}")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(1)
        ctx_dim = unet.config.cross_attention_dim
        out = {}
        with torch.no_grad():
            for tag, shape, t in (("square", (2, 4, 8, 8), 500.0), ("odd", (1, 4, 6, 10), 37.25)):
                sample = torch.randn(shape, generator=g)
                context = torch.randn((shape[0], 77, ctx_dim), generator=g)
                pred = unet(sample, torch.tensor(t), encoder_hidden_states=context).sample
                out[f"unet_{tag}_sample"] = sample
                out[f"unet_{tag}_context"] = context
                out[f"unet_{tag}_timestep"] = torch.tensor([t], dtype=torch.float64)
                out[f"unet_{tag}_out"] = pred
            latents = torch.randn((1, 4, 8, 6), generator=g)
            image = vae.decode(latents / vae.config.scaling_factor).sample
            out["vae_latents"] = latents
            out["vae_image"] = image
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "components", f"{name}.safetensors"))
        print(name, {k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main()
