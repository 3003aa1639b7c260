"""Writes tests/fixtures/schedulers/: diffusers reference values for `latent::schedulers`.

For each case (a scheduler_config.json, a scheduler, a step count, Karras on or off) it records
what diffusers computes: the timesteps, the sigmas (Euler, Euler a, DPM++ 2M) and the result of a
whole denoising loop on a fixed sample with a fake model (DDIM, PNDM, Euler, Euler a, DPM++ 2M,
LCM). tests/schedulers.rs replays every case.

Usage (from the repository root):
    HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/make_scheduler_fixtures.py [--new-only]

torch's vectorised float32 math (the training sigmas' sqrt, DPM-Solver's log/exp) differs in the
last bits between CPUs, and the Rust tests compare timesteps and sigmas exactly or to one ulp. So
a full run belongs on the CPU the kept fixtures were made on (cases.json `versions`); elsewhere,
`--new-only` keeps every existing case bit for bit, computes only the cases added to MATRIX, and
records the versions and CPU it used in those cases (`made_with`).

Schedulers are built the way users switch them: the file's own class loads the file
(`PNDMScheduler.from_config(file)`), then `Target.from_config(loaded.config,
use_karras_sigmas=...)`. So a key the file lacks takes the target class's default.

The fake model, also written out in tests/schedulers.rs and README.md:
    c(t) = float32(cos(t * 0.0123) * 0.8)      (t as a float64, cos from libm)
    model(x, t) = x * 0.1 + pattern * c(t)    (float32 tensor ops)

The loop is a diffusers pipeline's:
    x = sample * init_noise_sigma
    for t in timesteps: x = step(model(scale_model_input(x, t), t), t, x)
Each case also records add_noise(sample, pattern, timesteps[len // 2]) (img2img's noising).

Two deliberate differences from diffusers, both only where diffusers' own schedule disagrees with
itself, and both recorded in cases.json (`prev_timestep: "list"`):
  * DDIM and PNDM take the previous timestep from the timestep list. diffusers computes
    `t - num_train_timesteps // num_inference_steps`, which is the next list entry for "leading"
    spacing (every SD config) but not for "linspace"/"trailing" (diffusers issues #11347, #12633)
    nor for PRK half steps when that ratio is odd. For those cases the script runs diffusers' own
    step with alphas_cumprod patched at the index diffusers reads, so the recorded numbers are
    diffusers' arithmetic with list-based previous timesteps. For every other case it checks that
    the patch changes nothing.
  * Euler ancestral and LCM noise: the generators are a list (seed 1000 + i for batch row i), as
    `latent` does; every tensor diffusers drew is recorded, so the test does not depend on a torch
    RNG port.
"""

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402
from diffusers.schedulers import scheduling_lcm as lcm_module  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

CLASSES = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}
# The schedulers that draw noise in `step`, and the diffusers module whose randn_tensor they call.
NOISY = {"euler-a": euler_a_module, "lcm": lcm_module}
SAMPLE_SHAPE = (2, 4, 8, 8)
NOISE_SEED = 1000

# SD 1.5's scheduler/scheduler_config.json, as on the hub.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# SD 2.1's (768, v-prediction) scheduler/scheduler_config.json, as on the hub.
SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


# SimianLuo/LCM_Dreamshaper_v7's scheduler/scheduler_config.json (an LCM distilled from
# Dreamshaper v7, an SD 1.5 fine-tune).
LCM_DREAMSHAPER = {
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
# stabilityai/sd-turbo's and sdxl-turbo's scheduler/scheduler_config.json: Euler ancestral with
# "trailing" spacing, run at 1-4 steps.
TURBO = {
    "_class_name": "EulerAncestralDiscreteScheduler",
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
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def variant(base, **changes):
    cfg = dict(base)
    cfg.update(changes)
    return cfg


CONFIGS = {
    "sd15": SD15,
    "sd21": SD21,
    "sd15-linspace": variant(SD15, timestep_spacing="linspace"),
    "sd15-leading": variant(SD15, timestep_spacing="leading"),
    "sd15-trailing": variant(SD15, timestep_spacing="trailing"),
    "sd15-squaredcos": variant(SD15, beta_schedule="squaredcos_cap_v2"),
    "sd15-sample": variant(SD15, prediction_type="sample"),
    "sd15-prk": variant(SD15, skip_prk_steps=False),
    "sd15-clip": variant(SD15, clip_sample=True, clip_sample_range=1.5),
    "sd15-sigma-min": variant(SD15, final_sigmas_type="sigma_min"),
    "sd15-heun": variant(SD15, solver_type="heun"),
    "sd15-euler-at-final": variant(SD15, euler_at_final=True, lower_order_final=False),
    # Zero terminal SNR, the recipe of "Common Diffusion Noise Schedules and Sample Steps are
    # Flawed": rescaled betas, trailing spacing, v-prediction.
    "sd21-zsnr": variant(SD21, rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    # Only a class name: every key takes the target class's default (linear betas, PRK for PNDM,
    # clip_sample and set_alpha_to_one for DDIM).
    "minimal": {"_class_name": "PNDMScheduler"},
    "lcm-dreamshaper": LCM_DREAMSHAPER,
    # A shorter distillation schedule (k = 33) and a small timestep_scaling, so c_skip matters.
    "lcm-custom": variant(LCM_DREAMSHAPER, original_inference_steps=30, timestep_scaling=0.002),
    "turbo": TURBO,
}

# LCM has its own rows below (its recorded noise makes long schedules costly).
ALL = [kind for kind in CLASSES if kind != "lcm"]
# (config, schedulers, step counts, karras)
MATRIX = [
    ("sd15", ALL, [1, 7, 20, 50], False),
    ("sd21", ["ddim", "pndm", "euler", "dpm++2m"], [1, 7, 20, 50], False),
    ("sd21", ["euler-a"], [1, 7, 20], False),
    ("sd15", ["euler", "dpm++2m"], [1, 7, 20, 50], True),
    ("sd21", ["euler", "dpm++2m"], [7, 20], True),
    # Euler a records its noise (2 KiB a step): fewer steps for it keep the file under 1 MiB.
    ("sd15-linspace", ["ddim", "pndm", "euler", "dpm++2m"], [7, 20], False),
    ("sd15-leading", ["euler", "dpm++2m"], [7, 20], False),
    ("sd15-trailing", ["ddim", "pndm", "euler", "dpm++2m"], [7, 20], False),
    ("sd15-linspace", ["euler-a"], [7], False),
    ("sd15-leading", ["euler-a"], [7], False),
    ("sd15-trailing", ["euler-a"], [7], False),
    # 61 steps: numpy's arange gives 62 "trailing" timesteps, the last one -1.
    ("sd15-trailing", ["euler", "dpm++2m"], [61], False),
    ("sd15-squaredcos", ALL, [7, 20], False),
    # Not DPM++ 2M: its Karras timesteps repeat there (998 nine times) and diffusers' step index
    # lookup, which takes the second match, runs off the end of the schedule.
    ("sd15-squaredcos", ["euler"], [20], True),
    ("sd15-sample", ["ddim", "euler", "dpm++2m"], [7, 20], False),
    ("sd15-prk", ["pndm"], [4, 7, 9, 20], False),
    ("sd15-clip", ["ddim"], [7, 20], False),
    ("sd15-sigma-min", ["euler", "dpm++2m"], [7, 20], False),
    ("sd15-heun", ["dpm++2m"], [7, 20], False),
    ("sd15-euler-at-final", ["dpm++2m"], [20], False),
    ("sd21-zsnr", ["ddim", "euler", "euler-a", "dpm++2m"], [7, 20], False),
    ("minimal", ALL, [7], False),
    # LCM (its noise is recorded too: few steps). From its own config, and switched to from SD
    # 1.5's (PNDM), SD 2.1's (v_prediction) and other configs.
    ("lcm-dreamshaper", ["lcm"], [1, 2, 4, 8], False),
    ("lcm-custom", ["lcm"], [3, 5], False),
    ("sd15", ["lcm"], [4], False),
    ("sd21", ["lcm"], [4], False),
    ("sd21-zsnr", ["lcm"], [2], False),
    ("sd15-sample", ["lcm"], [2], False),
    ("sd15-clip", ["lcm"], [2], False),
    ("sd15-squaredcos", ["lcm"], [2], False),
    ("minimal", ["lcm"], [2], False),
    # SD-Turbo / SDXL-Turbo: Euler a, trailing, 1-4 steps.
    ("turbo", ["euler-a"], [1, 2, 4], False),
]


def fake_model(x, t, pattern):
    c = math.cos(float(t) * 0.0123) * 0.8
    return x * 0.1 + pattern * c


def build(config_path, kind, karras):
    file_cfg = json.loads(Path(config_path).read_text())
    loaded = getattr(diffusers, file_cfg["_class_name"]).from_config(file_cfg)
    extra = {"use_karras_sigmas": True} if karras else {}
    return CLASSES[kind].from_config(loaded.config, **extra)


def list_prev(distinct, t):
    """The timestep after t in the descending list of distinct timesteps, or None."""
    i = distinct.index(t)
    return distinct[i + 1] if i + 1 < len(distinct) else None


class AlphasPatch:
    """Makes diffusers' DDIM/PNDM read list-based previous timesteps (see the module docstring)."""

    def __init__(self, sched, kind):
        self.sched = sched
        self.kind = kind
        self.orig = sched.alphas_cumprod.clone()
        self.ratio = sched.config.num_train_timesteps // sched.num_inference_steps
        if kind == "ddim":
            self.distinct = [int(t) for t in sched.timesteps]
        else:
            self.distinct = sorted({int(t) for t in sched._timesteps}, reverse=True)
        self.counter = 0
        self.changed = False

    def _alpha(self, t):
        return self.orig[t] if t is not None else self.sched.final_alpha_cumprod

    def _set(self, index, target):
        """Before a step: alphas_cumprod[index] (what diffusers reads) := alpha at target."""
        if index < 0:
            if target is not None:
                raise RuntimeError("diffusers reads final_alpha_cumprod where the list has more")
            return
        if index >= len(self.orig):
            raise RuntimeError(f"index {index} out of range")
        value = self._alpha(target)
        if not torch.equal(self.orig[index], value):
            self.changed = True
        self.sched.alphas_cumprod[index] = value

    def before_step(self, t):
        t = int(t)
        self.sched.alphas_cumprod = self.orig.clone()
        ratio = self.ratio
        if self.kind == "ddim":
            self._set(t - ratio, list_prev(self.distinct, t))
            return
        s = self.sched
        c = self.counter
        if c < len(s.prk_timesteps) and not s.config.skip_prk_steps:
            prk = [int(x) for x in s.prk_timesteps]
            g, r = c // 4 * 4, c % 4
            target = prk[g + 1] if r < 2 else prk[g + 3]
            diff = 0 if c % 2 else ratio // 2
            self._set(t - diff, target)
        elif c == 1:
            # diffusers: prev = t, timestep = t + ratio; the list's step runs from the distinct
            # timestep before t.
            i = self.distinct.index(t)
            self._set(t + ratio, self.distinct[i - 1])
        else:
            self._set(t - ratio, list_prev(self.distinct, t))
        self.counter += 1

    def after_loop(self):
        self.sched.alphas_cumprod = self.orig


def run_loop(sched, kind, steps, sample, pattern, patch):
    sched.set_timesteps(steps)
    x = sample * sched.init_noise_sigma
    generators = None
    if kind in NOISY:
        generators = [torch.Generator("cpu").manual_seed(NOISE_SEED + i) for i in range(x.shape[0])]
    patcher = AlphasPatch(sched, kind) if patch else None
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        out = fake_model(inp, t, pattern)
        if patcher:
            patcher.before_step(t)
        if kind in NOISY:
            x = sched.step(out, t, x, generator=generators).prev_sample
        else:
            x = sched.step(out, t, x).prev_sample
    changed = False
    if patcher:
        patcher.after_loop()
        changed = patcher.changed
    return x, changed


def record_noise():
    """Wraps diffusers' randn_tensor in the modules of NOISY; returns the list it fills."""
    drawn = []
    originals = {module: module.randn_tensor for module in NOISY.values()}

    def wrap(original):
        def recording(*args, **kwargs):
            t = original(*args, **kwargs)
            drawn.append(t.clone())
            return t

        return recording

    for module, original in originals.items():
        module.randn_tensor = wrap(original)

    def restore():
        for module, original in originals.items():
            module.randn_tensor = original

    return drawn, restore


def make_case(config_path, config_name, kind, steps, karras, sample, pattern, tensors):
    """Runs one case through diffusers, adds its tensors to `tensors`, returns its manifest entry."""
    name = case_name(config_name, kind, steps, karras)
    sched = build(config_path, kind, karras)
    drawn, restore = record_noise()
    try:
        final, _ = run_loop(build(config_path, kind, karras), kind, steps, sample, pattern, False)
        drawn.clear()
        patch = kind in ("ddim", "pndm")
        final_list, changed = run_loop(sched, kind, steps, sample, pattern, patch)
    finally:
        restore()
    spacing = sched.config.timestep_spacing
    prk = kind == "pndm" and not sched.config.skip_prk_steps
    if patch and not changed and not torch.equal(final, final_list):
        raise RuntimeError(f"{name}: the patch changed the result without changing alphas")
    if patch and changed and spacing == "leading" and not prk:
        raise RuntimeError(f"{name}: list and diffusers' arithmetic differ for leading")
    if not torch.isfinite(final_list).all():
        raise RuntimeError(f"{name}: non-finite result")

    tensors[f"{name}/timesteps"] = sched.timesteps.to(torch.float64)
    has_sigmas = kind in ("euler", "euler-a", "dpm++2m")
    if has_sigmas:
        tensors[f"{name}/sigmas"] = sched.sigmas.to(torch.float32)
    tensors[f"{name}/final"] = final_list
    # Euler a draws on every step; LCM on every step but the last.
    if kind in NOISY:
        expected_draws = len(sched.timesteps) - (1 if kind == "lcm" else 0)
        if len(drawn) != expected_draws:
            raise RuntimeError(f"{name}: {len(drawn)} noise draws, expected {expected_draws}")
    elif drawn:
        raise RuntimeError(f"{name}: a deterministic scheduler drew noise")
    if drawn:
        tensors[f"{name}/noise"] = torch.stack(drawn)
    # add_noise (img2img) at the middle of the schedule, where that timestep is
    # unique (diffusers looks the index up from the timestep's value).
    fresh = build(config_path, kind, karras)
    fresh.set_timesteps(steps)
    mid = len(fresh.timesteps) // 2
    has_add_noise = int((fresh.timesteps == fresh.timesteps[mid]).sum()) == 1
    if has_add_noise:
        noised = fresh.add_noise(sample, pattern, fresh.timesteps[mid : mid + 1])
        tensors[f"{name}/add_noise"] = noised
    print(f"{name}: {len(sched.timesteps)} timesteps{' (list-based prev)' if changed else ''}")
    return {
        "name": name,
        "config": f"configs/{config_name}.json",
        "scheduler": kind,
        "steps": steps,
        "karras": karras,
        "init_noise_sigma": float(sched.init_noise_sigma),
        "num_timesteps": len(sched.timesteps),
        "has_sigmas": has_sigmas,
        "has_noise": bool(drawn),
        "noise_draws": len(drawn),
        "add_noise_index": mid if has_add_noise else None,
        "prev_timestep": "list" if changed else "diffusers",
        "max_abs_diff_vs_unpatched_diffusers": float((final - final_list).abs().max()),
    }


def case_name(config_name, kind, steps, karras):
    return f"{config_name}/{kind}/{steps}" + ("/karras" if karras else "")


def cpu_name():
    """The CPU model (torch's vectorised float math differs in the last bits between CPUs)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/schedulers")
    parser.add_argument(
        "--new-only",
        action="store_true",
        help="keep every case already in OUT as it is and compute only the missing ones "
        "(torch's vectorised math differs in the last bits between CPUs)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    (out / "configs").mkdir(parents=True, exist_ok=True)

    for name, cfg in CONFIGS.items():
        (out / "configs" / f"{name}.json").write_text(json.dumps(cfg, indent=2) + "\n")

    meta = versions()
    sample = torch.randn(SAMPLE_SHAPE, generator=torch.Generator("cpu").manual_seed(0))
    pattern = torch.randn(SAMPLE_SHAPE, generator=torch.Generator("cpu").manual_seed(1))
    tensors = {"sample": sample, "pattern": pattern}
    kept_cases = {}
    file_meta = meta
    if args.new_only:
        manifest = json.loads((out / "cases.json").read_text())
        file_meta = manifest["versions"]
        kept_cases = {case["name"]: case for case in manifest["cases"]}
        kept = load_file(str(out / "schedulers.safetensors"))
        for key in ("sample", "pattern"):
            if not torch.equal(kept[key], tensors[key]):
                raise RuntimeError(f"this torch draws another `{key}` than the kept cases used")
        tensors = kept
    cases = []

    for config_name, kinds, step_counts, karras in MATRIX:
        config_path = out / "configs" / f"{config_name}.json"
        for kind in kinds:
            for steps in step_counts:
                name = case_name(config_name, kind, steps, karras)
                if name in kept_cases:
                    case = kept_cases.pop(name)
                    # Manifests older than LCM lack the draw count: one per recorded tensor.
                    noise = tensors.get(f"{name}/noise")
                    case.setdefault("noise_draws", 0 if noise is None else noise.shape[0])
                    cases.append(case)
                    continue
                case = make_case(config_path, config_name, kind, steps, karras, sample, pattern, tensors)
                if args.new_only:
                    case["made_with"] = meta
                cases.append(case)
    if kept_cases:
        raise RuntimeError(f"cases no longer in MATRIX: {sorted(kept_cases)}")

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "schedulers.safetensors"), metadata={"versions": json.dumps(file_meta)})
    manifest = {
        "versions": file_meta,
        "sample_shape": list(SAMPLE_SHAPE),
        "noise_seed": NOISE_SEED,
        "model": "model(x, t) = x * 0.1 + pattern * float32(cos(t * 0.0123) * 0.8)",
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = (out / "schedulers.safetensors").stat().st_size
    print(f"{len(cases)} cases, schedulers.safetensors {size / 1024:.0f} KiB", file=sys.stderr)


if __name__ == "__main__":
    main()
