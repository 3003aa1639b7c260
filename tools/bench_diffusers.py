#!/usr/bin/env python3
"""The diffusers (PyTorch CPU) side of tools/bench.sh and tools/bench_turbo.sh: same stages and
JSON fields as `latent bench --json`, for the same model folder, size, steps and threads.

    HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/bench_diffusers.py MODEL_DIR --width 256 --height 256 --steps 4 --threads 2
    HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/bench_diffusers.py SDXL_DIR --width 1024 --height 1024 --steps 2 --dtype bf16
    HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/bench_diffusers.py TURBO_DIR --vae TAESD_DIR --steps 1 --guidance 0 \\
        --scheduler euler-a --width 512 --height 512 --repeat 3

The pipeline class comes from MODEL_DIR/model_index.json (StableDiffusionPipeline,
StableDiffusionXLPipeline, ...). One image is generated from the prompt, end to end
(text encoding, denoising, VAE decode, conversion to a PIL image); the stages are timed inside that
run by wrapping the pipeline's encode_prompt and vae.decode and by the step callback.

--dtype bf16 loads with torch_dtype=torch.bfloat16 (latents follow the text embeddings' dtype), which
runs on AMX / AVX512-BF16 through oneDNN. --vae DIR replaces the pipeline's VAE by the
AutoencoderKL or AutoencoderTiny in DIR (a folder with config.json, like madebyollin/taesd).
--guidance 0 (anything <= 1) turns classifier-free guidance off. An SDXL negative prompt is left
empty, so force_zeros_for_empty_prompt applies as in diffusers' default use.

JSON fields: load_s (every weight touched), text_encode_s, step_s_median (steps after the first),
step_s_first, step_s_all, decode_s, total_s (one image, model loaded: prompt in, PIL image out),
cold_s (process start to the end of the first image, imports and load included), peak_rss_bytes.
The *_cpu_s fields are the process's CPU seconds over the same stages (all threads): on a shared,
loaded machine, cpu / threads estimates the wall time the stage would take with the cores to itself.
loadavg_1m_start / _end: the machine's 1-minute load average when the process started and ended.
--repeat N generates N images; the stage fields and total_s then describe the runs after the first
(medians; the first run pays one-time oneDNN set-up), and total_s_all lists every run.
"""
import time

T_START = time.perf_counter()
LOAD_START = __import__("os").getloadavg()[0]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torch_dtype.*")

import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

DTYPES = {"fp32": torch.float32, "f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "f16": torch.float16}
SCHEDULERS = {"euler": EulerDiscreteScheduler, "euler-a": EulerAncestralDiscreteScheduler}


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def load(a, dtype):
    index = json.loads((Path(a.model) / "model_index.json").read_text())
    kwargs = {"torch_dtype": dtype}
    if index["_class_name"].startswith("StableDiffusionXL"):
        kwargs["add_watermarker"] = False
    elif "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if a.vae:
        cls = json.loads((Path(a.vae) / "config.json").read_text())["_class_name"]
        kwargs["vae"] = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}[cls].from_pretrained(
            a.vae, torch_dtype=dtype)
    pipe = DiffusionPipeline.from_pretrained(a.model, **kwargs)
    # diffusers maps safetensors lazily: touch every weight so "load" means loaded.
    with torch.no_grad():
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                for p in m.parameters():
                    p.sum()
    if a.scheduler != "model":
        pipe.scheduler = SCHEDULERS[a.scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_once(pipe, a):
    """One image end to end, with its stage times."""
    rec = {"text": 0.0, "decode": 0.0, "steps": [], "text_cpu": 0.0, "decode_cpu": 0.0, "steps_cpu": []}
    last, last_cpu = [0.0], [0.0]
    encode, decode = pipe.encode_prompt, pipe.vae.decode

    def timed_encode(*args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        out = encode(*args, **kwargs)
        last[0], last_cpu[0] = time.perf_counter(), time.process_time()
        rec["text"] += last[0] - t
        rec["text_cpu"] += last_cpu[0] - c
        return out

    def timed_decode(*args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        out = decode(*args, **kwargs)
        rec["decode"] += time.perf_counter() - t
        rec["decode_cpu"] += time.process_time() - c
        return out

    def on_step(_pipe, _i, _t, kwargs):
        now, now_cpu = time.perf_counter(), time.process_time()
        rec["steps"].append(now - last[0])
        rec["steps_cpu"].append(now_cpu - last_cpu[0])
        last[0], last_cpu[0] = now, now_cpu
        return kwargs

    pipe.encode_prompt, pipe.vae.decode = timed_encode, timed_decode
    try:
        gen = [torch.Generator("cpu").manual_seed(a.seed)]
        t, c = time.perf_counter(), time.process_time()
        image = pipe(prompt=a.prompt, width=a.width, height=a.height, num_inference_steps=a.steps,
                     guidance_scale=a.guidance, generator=gen, output_type="pil",
                     callback_on_step_end=on_step).images[0]
        rec["total"] = time.perf_counter() - t
        rec["total_cpu"] = time.process_time() - c
    finally:
        del pipe.encode_prompt
        del pipe.vae.decode
    rec["image"] = image
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    ap.add_argument("--width", type=int, help="default: the model's native size")
    ap.add_argument("--height", type=int, help="default: the model's native size")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5, help="<= 1 turns classifier-free guidance off")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--vae", help="folder of an AutoencoderKL or AutoencoderTiny replacing the model's VAE")
    ap.add_argument("--scheduler", choices=[*SCHEDULERS, "model"], default="euler",
                    help="euler (default), euler-a, or the model's own scheduler")
    ap.add_argument("--repeat", type=int, default=1, help="images to generate (stats from runs 2..N)")
    ap.add_argument("--save", help="write the (last) image to this PNG file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype]

    t = time.perf_counter()
    pipe = load(a, dtype)
    load_s = time.perf_counter() - t
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    a.width, a.height = a.width or native, a.height or native

    runs = []
    for i in range(max(a.repeat, 1)):
        runs.append(run_once(pipe, a))
        if i == 0:
            cold = time.perf_counter() - T_START
    if a.save:
        runs[-1]["image"].save(a.save)
    warm = runs[1:] or runs
    steps, steps_cpu = warm[-1]["steps"], warm[-1]["steps_cpu"]
    steady = steps[1:] if len(steps) > 1 else steps
    steady_cpu = steps_cpu[1:] if len(steps_cpu) > 1 else steps_cpu

    print(json.dumps({
        "tool": f"diffusers {diffusers.__version__} torch {torch.__version__}",
        "pipeline": type(pipe).__name__, "vae": type(pipe.vae).__name__,
        "scheduler": type(pipe.scheduler).__name__, "dtype": a.dtype, "guidance": a.guidance,
        "width": a.width, "height": a.height, "steps": len(steps), "threads": torch.get_num_threads(),
        "repeat": len(runs),
        "load_s": load_s,
        "text_encode_s": median([r["text"] for r in warm]),
        "step_s_median": median(steady), "step_s_first": steps[0], "step_s_all": steps,
        "decode_s": median([r["decode"] for r in warm]),
        "total_s": median([r["total"] for r in warm]), "total_s_all": [r["total"] for r in runs],
        "cold_s": cold,
        "text_encode_cpu_s": median([r["text_cpu"] for r in warm]), "step_cpu_s_median": median(steady_cpu),
        "decode_cpu_s": median([r["decode_cpu"] for r in warm]), "total_cpu_s": median([r["total_cpu"] for r in warm]),
        "loadavg_1m_start": LOAD_START, "loadavg_1m_end": os.getloadavg()[0],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
