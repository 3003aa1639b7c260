"""img2img and inpainting fixtures and goldens: tests/fixtures/img2img/ and tests/fixtures/tiny-sd1-inpaint/.

Writes
  img2img/init.png         a 32x32 RGB picture (smooth colours, an edge)
  img2img/mask.png         its 32x32 mask: white square (redrawn), black elsewhere, a band of
                           greys around 127/128 where diffusers' binarization splits
  img2img/init-xl.png      the same picture at tiny-sdxl's size
  img2img/mask-xl.png      its mask
  tiny-sd1-inpaint/        a 9-channel inpainting UNet (random, small) beside symbolic links to
                           tiny-sd1's text encoder, tokenizer, VAE and scheduler
and the goldens, img2img/diffusers.safetensors: the final latents (output_type="latent") of
diffusers' own pipelines, one generator per image (seed 3), on these inputs:
  StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline (4- and 9-channel UNets),
  their SDXL counterparts, the img2img pipeline with an AutoencoderTiny VAE, and
  LatentConsistencyModelImg2ImgPipeline; plus one decoded image (uint8) for the 1/255 check.

Run from the repository root: "${PYTHON:-python3}" tools/make_img2img_fixtures.py
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelImg2ImgPipeline,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "tests" / "fixtures"
OUT = FX / "img2img"
INPAINT = FX / "tiny-sd1-inpaint"
PROMPT = "a photo of a cat"
NEGATIVE = "blurry"
SEED = 3

SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
}


def picture(size):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    r = 255 * x
    g = 255 * y
    b = np.where(x + y > 1.0, 230.0, 40.0)
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8), "RGB")


def mask(size):
    m = np.zeros((size, size), np.uint8)
    q = size // 4
    m[q:3 * q, q:3 * q] = 255
    # A band of greys on both sides of diffusers' 0.5 split (127 -> kept, 128 -> redrawn).
    m[3 * q:3 * q + 2, q:3 * q] = 127
    m[q - 2:q, q:3 * q] = 128
    return Image.fromarray(m, "L")


def write_inputs(xl_size):
    OUT.mkdir(parents=True, exist_ok=True)
    picture(32).save(OUT / "init.png")
    mask(32).save(OUT / "mask.png")
    picture(xl_size).save(OUT / "init-xl.png")
    mask(xl_size).save(OUT / "mask-xl.png")


def write_inpaint_model():
    """tiny-sd1's components with a small random 9-channel UNet of its own."""
    INPAINT.mkdir(exist_ok=True)
    for name in ["text_encoder", "tokenizer", "vae", "scheduler"]:
        link = INPAINT / name
        if not link.is_symlink():
            os.symlink(Path("..") / "tiny-sd1" / name, link)
    index = json.loads((FX / "tiny-sd1" / "model_index.json").read_text())
    (INPAINT / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(INPAINT / "unet", safe_serialization=True)


def gen():
    return [torch.Generator().manual_seed(SEED)]


def with_scheduler(pipe, name):
    """Sets scheduler `name` from the model's own scheduler config (not the last one set, whose
    keys, such as use_karras_sigmas, would carry over)."""
    if not hasattr(pipe, "_model_scheduler_config"):
        pipe._model_scheduler_config = dict(pipe.scheduler.config)
    cls, extra = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe._model_scheduler_config, **extra)
    return pipe


@torch.no_grad()
def goldens(xl_size):
    out = {}
    init = Image.open(OUT / "init.png").convert("RGB")
    m = Image.open(OUT / "mask.png")
    f32 = dict(torch_dtype=torch.float32)
    sd = dict(safety_checker=None, requires_safety_checker=False, **f32)

    i2i = StableDiffusionImg2ImgPipeline.from_pretrained(FX / "tiny-sd1", **sd)
    for key, sched, steps, strength in [
        ("sd1/euler", "euler", 8, 0.6),
        ("sd1/euler-a", "euler-a", 6, 0.75),
        ("sd1/dpm++2m-karras", "dpm++2m-karras", 10, 0.5),
        ("sd1/ddim", "ddim", 5, 0.8),
        ("sd1/pndm", "pndm", 5, 0.6),
    ]:
        with_scheduler(i2i, sched)
        out[key] = i2i(PROMPT, image=init, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
                       negative_prompt=NEGATIVE, generator=gen(), output_type="latent").images
    with_scheduler(i2i, "euler")
    img = i2i(PROMPT, image=init, strength=0.6, num_inference_steps=8, guidance_scale=7.5,
              negative_prompt=NEGATIVE, generator=gen(), output_type="np").images
    out["sd1/euler/image"] = torch.from_numpy((img[0] * 255).round().astype(np.uint8))

    taesd = AutoencoderTiny.from_pretrained(FX / "tiny-taesd", **f32)
    tiny = StableDiffusionImg2ImgPipeline.from_pretrained(FX / "tiny-sd1", vae=taesd, **sd)
    with_scheduler(tiny, "euler")
    out["sd1-taesd/euler"] = tiny(PROMPT, image=init, strength=0.7, num_inference_steps=6, guidance_scale=7.5,
                                  generator=gen(), output_type="latent").images

    legacy = StableDiffusionInpaintPipeline.from_pretrained(FX / "tiny-sd1", **sd)
    for key, sched, steps, strength in [
        ("sd1-inpaint-legacy/euler", "euler", 6, 1.0),
        ("sd1-inpaint-legacy/ddim", "ddim", 6, 0.7),
        ("sd1-inpaint-legacy/euler-a", "euler-a", 5, 0.8),
    ]:
        with_scheduler(legacy, sched)
        out[key] = legacy(PROMPT, image=init, mask_image=m, strength=strength, num_inference_steps=steps,
                          guidance_scale=7.5, height=32, width=32, generator=gen(),
                          output_type="latent").images

    nine = StableDiffusionInpaintPipeline.from_pretrained(INPAINT, **sd)
    for key, sched, steps, strength in [
        ("sd1-inpaint/euler-a", "euler-a", 6, 1.0),
        ("sd1-inpaint/dpm++2m", "dpm++2m", 8, 0.6),
    ]:
        with_scheduler(nine, sched)
        out[key] = nine(PROMPT, image=init, mask_image=m, strength=strength, num_inference_steps=steps,
                        guidance_scale=7.5, height=32, width=32, generator=gen(),
                        output_type="latent").images

    xl_init = Image.open(OUT / "init-xl.png").convert("RGB")
    xl_mask = Image.open(OUT / "mask-xl.png")
    xl = StableDiffusionXLImg2ImgPipeline.from_pretrained(FX / "tiny-sdxl", **f32)
    with_scheduler(xl, "euler")
    out["sdxl/euler"] = xl(PROMPT, image=xl_init, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                           generator=gen(), output_type="latent").images
    xli = StableDiffusionXLInpaintPipeline.from_pretrained(FX / "tiny-sdxl", **f32)
    with_scheduler(xli, "euler")
    out["sdxl-inpaint-legacy/euler"] = xli(PROMPT, image=xl_init, mask_image=xl_mask, strength=0.8,
                                           num_inference_steps=5, guidance_scale=5.0, height=xl_size,
                                           width=xl_size, generator=gen(), output_type="latent").images

    lcm = LatentConsistencyModelImg2ImgPipeline.from_pretrained(FX / "tiny-lcm", **sd)
    out["lcm/lcm"] = lcm(PROMPT, image=init, strength=0.5, num_inference_steps=4, guidance_scale=8.0,
                         generator=gen(), output_type="latent").images
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "diffusers.safetensors")


def main():
    vae_scale = 2 ** (len(json.loads((FX / "tiny-sdxl" / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    xl_size = json.loads((FX / "tiny-sdxl" / "unet" / "config.json").read_text())["sample_size"] * vae_scale
    write_inputs(xl_size)
    write_inpaint_model()
    goldens(xl_size)


if __name__ == "__main__":
    main()
