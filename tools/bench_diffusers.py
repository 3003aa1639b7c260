#!/usr/bin/env python3
"""The diffusers (PyTorch CPU) side of tools/bench.sh: same stages and JSON fields as
`latent bench --json`, for the same model folder, size, steps and threads.

    HF_HUB_OFFLINE=1 python tools/bench_diffusers.py MODEL_DIR --width 256 --height 256 --steps 4 --threads 2
"""
import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    # diffusers maps safetensors lazily: touch every weight so "load" means loaded.
    with torch.no_grad():
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in m.parameters():
                p.sum()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    load = time.perf_counter() - t

    with torch.no_grad():
        t = time.perf_counter()
        cond, uncond = pipe.encode_prompt(a.prompt, "cpu", 1, a.guidance > 1, "")
        text = time.perf_counter() - t

        steps = []
        last = [time.perf_counter()]

        def on_step(_pipe, _i, _t, kwargs):
            now = time.perf_counter()
            steps.append(now - last[0])
            last[0] = now
            return kwargs

        gen = [torch.Generator("cpu").manual_seed(a.seed)]
        last[0] = time.perf_counter()
        latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, width=a.width, height=a.height,
                       num_inference_steps=a.steps, guidance_scale=a.guidance, generator=gen,
                       output_type="latent", callback_on_step_end=on_step).images
        t = time.perf_counter()
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
        decode = time.perf_counter() - t

    steady = sorted(steps[1:] if len(steps) > 1 else steps)
    print(json.dumps({
        "tool": f"diffusers {__import__('diffusers').__version__} torch {torch.__version__}",
        "width": a.width, "height": a.height, "steps": len(steps), "threads": torch.get_num_threads(),
        "load_s": load, "text_encode_s": text, "step_s_median": steady[len(steady) // 2],
        "step_s_first": steps[0], "step_s_all": steps, "decode_s": decode,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
