#!/usr/bin/env python3
"""Builds the tiny random-weight Stable Diffusion fixtures and their goldens.

Writes, under tests/fixtures/ (or --out):
  tiny-sd1/  SD 1.x layout: CLIP text encoder with quick_gelu, PNDM scheduler, pad <|endoftext|>,
             tokenizer as vocab.json + merges.txt only (like hub SD repos).
  tiny-sd2/  SD 2.x layout: gelu text encoder, linear projections, upcast attention, DDIM with
             v_prediction, pad "!", VAE attention under the old query/key/value/proj_attn names,
             tokenizer with vocab.json + merges.txt AND tokenizer.json.
  golden/    cases.json plus safetensors/npy files produced by diffusers from those folders.

Every weight is drawn from seeded generators, rounded to float16 and stored as float16; the goldens
are computed in float32 from exactly those rounded values, by a pipeline loaded back from the folder.

Run offline, with a Python (PYTHON, default python3) that has the packages listed in the fixtures README:
  HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/make_tiny_models.py
"""

import argparse
import gzip
import json
import logging
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import open_clip  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LEN = 77

# The scheduler files of the real checkpoints (runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1), key for key. Built through from_config, which accepts keys a
# constructor would reject (clip_sample for PNDM), and saved with save_config, which adds every
# key the class knows with its default (e.g. timestep_spacing "leading", absent from both files).
SD15_SCHEDULER = {
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
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.10.0.dev0",
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

LONG_PROMPT = (
    "A highly detailed oil painting of an old lighthouse standing on a rocky cliff above a stormy "
    "sea at dusk, with crashing waves, seagulls circling in the wind, dark clouds lit from below by "
    "a golden sunset, a small fishing boat struggling through the swell, warm light glowing from the "
    "lighthouse windows, wet rocks reflecting the sky, dramatic composition, rich textures, thick "
    "brush strokes, muted blues and warm oranges, in the style of a nineteenth century maritime "
    "painter, museum quality, sharp focus, cinematic lighting, volumetric fog, 8k resolution, "
    "trending on an art gallery wall, masterpiece, award winning, intricate details everywhere."
)

# Prompts whose ids are recorded for both models. Beyond the brief's list: whitespace collapse,
# a decomposed accent (NFC), contractions, a non-Latin script and an emoji (byte-level fallback).
TOKEN_PROMPTS = [
    "a photo of a cat",
    "",
    "A PHOTO of a Cat!!",
    "café, 3 dogs & 12 cats",
    "cafe\u0301 au lait",
    "  a   photo\tof\n a cat  ",
    "it's a dog's life, isn't it?",
    "東京の夜景 🐱",
    LONG_PROMPT,
]
EMBED_PROMPTS = ["a photo of a cat", "", "A PHOTO of a Cat!!", LONG_PROMPT]

SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}


# --------------------------------------------------------------------------------------------
# Tokenizer files


def clip_vocab_and_merges():
    """The OpenAI CLIP BPE (as in every SD 1.x/2.x repo), rebuilt from open_clip's merges file."""
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # Line 0 is a header; CLIP uses the next 49152 - 256 - 2 merges.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split(" ")) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return vocab, merges


def added_token(content):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_tokenizer(dir_, pad_token, with_tokenizer_json):
    """Writes the hub-style slow-tokenizer files; optionally the fast tokenizer.json too."""
    dir_.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (dir_ / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dir_ / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": added_token(BOS),
        "eos_token": added_token(EOS),
        "pad_token": pad_token,
        "unk_token": added_token(EOS),
    }
    for d in special.values():
        if isinstance(d, dict):
            d.pop("__type")
    (dir_ / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "add_prefix_space": False,
        "bos_token": added_token(BOS),
        "do_lower_case": True,
        "eos_token": added_token(EOS),
        "errors": "replace",
        "model_max_length": MAX_LEN,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token(EOS),
    }
    (dir_ / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = CLIPTokenizer.from_pretrained(dir_)
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    if with_tokenizer_json:
        backend = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        backend.save(str(dir_ / "tokenizer.json"), pretty=False)
    return tok


# --------------------------------------------------------------------------------------------
# Models


def reinit_(model, seed):
    """Re-initialises every parameter from a seeded generator, then rounds it to float16.

    Linear/conv weights ~ N(0, 1/fan_in); embeddings ~ N(0, 0.1^2); other biases ~ N(0, 0.05^2);
    norm weights 1 + N(0, 0.1^2) and norm biases N(0, 0.1^2), so that a missing norm scale or
    shift shows up in parity tests.
    """
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            module = modules[owner]
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if isinstance(module, norm_types):
                value = 1.0 + 0.1 * noise if leaf == "weight" else 0.1 * noise
            elif isinstance(module, torch.nn.Embedding):
                value = 0.1 * noise
            elif leaf == "weight" and p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                value = noise / fan_in**0.5
            else:
                value = 0.05 * noise
            p.copy_(value.to(torch.float16).to(torch.float32))
    return model


def unet_kwargs(sd2):
    kw = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[32, 64, 64],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=2,
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    if sd2:
        kw.update(attention_head_dim=[2, 4, 4], use_linear_projection=True, upcast_attention=True)
    return kw


def vae_kwargs(sd2):
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=[16, 32, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025 if sd2 else 0.18215,
    )


def text_config(sd2):
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        hidden_act="gelu" if sd2 else "quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
        # The ids the real SD text_encoder/config.json files carry (legacy values).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    cfg.architectures = ["CLIPTextModel"]
    return cfg


OLD_VAE_ATTENTION_NAMES = {
    ".to_q.": ".query.",
    ".to_k.": ".key.",
    ".to_v.": ".value.",
    ".to_out.0.": ".proj_attn.",
}


def half_state_dict(model, prefix="", rename=None):
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if rename:
            for old, new in rename.items():
                k = k.replace(old, new)
        out[prefix + k] = v.detach().to(torch.float16).contiguous()
    return out


def build_model(root, sd2, seed):
    """Writes one tiny model folder and returns the in-memory (rounded) components."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    pad = "!" if sd2 else EOS
    tokenizer = write_tokenizer(root / "tokenizer", pad, with_tokenizer_json=sd2)

    unet = reinit_(UNet2DConditionModel(**unet_kwargs(sd2)), seed)
    vae = reinit_(AutoencoderKL(**vae_kwargs(sd2)), seed + 1)
    text_encoder = reinit_(CLIPTextModel(text_config(sd2)), seed + 2)
    sched_cfg = SD21_SCHEDULER if sd2 else SD15_SCHEDULER
    sched_cls = DDIMScheduler if sd2 else PNDMScheduler
    scheduler = sched_cls.from_config(sched_cfg)

    meta = {"format": "pt"}
    unet.save_config(root / "unet")
    save_file(half_state_dict(unet), root / "unet" / "diffusion_pytorch_model.safetensors", meta)
    vae.save_config(root / "vae")
    rename = OLD_VAE_ATTENTION_NAMES if sd2 else None
    save_file(
        half_state_dict(vae, rename=rename),
        root / "vae" / "diffusion_pytorch_model.safetensors",
        meta,
    )
    text_encoder.config.save_pretrained(root / "text_encoder")
    # transformers 5 drops the `text_model.` prefix when saving; hub files have it.
    te = {
        ("text_model." + k if not k.startswith("text_model.") else k): v
        for k, v in half_state_dict(text_encoder).items()
    }
    save_file(te, root / "text_encoder" / "model.safetensors", meta)
    scheduler.save_config(root / "scheduler")

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_config(root)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def load_pipeline(root):
    pipe = StableDiffusionPipeline.from_pretrained(
        root, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_roundtrip(pipe, built):
    """The folder loads back into exactly the rounded weights (layout, prefix and names right)."""
    for name, model in built.items():
        loaded = getattr(pipe, name).state_dict()
        for k, v in model.state_dict().items():
            if k.endswith("position_ids"):
                continue
            got = loaded[k]
            assert got.dtype == torch.float32, (name, k, got.dtype)
            assert torch.equal(got, v), f"{name}.{k} differs after reload"


# --------------------------------------------------------------------------------------------
# Goldens


class WarningCatcher(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def token_cases(pipes, roots, simple):
    cases = []
    diff_logger = logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    for model, pipe in pipes.items():
        tok = pipe.tokenizer
        root = roots[model]
        from_vocab = CLIPTokenizer(
            vocab=json.loads((root / "tokenizer" / "vocab.json").read_text(encoding="utf-8")),
            merges=[
                tuple(m.split(" "))
                for m in (root / "tokenizer" / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
            ],
            pad_token=tok.pad_token,
        )
        tj = root / "tokenizer" / "tokenizer.json"
        raw = tokenizers.Tokenizer.from_file(str(tj)) if tj.exists() else None
        for prompt in TOKEN_PROMPTS:
            ids = tok(
                prompt, padding="max_length", max_length=MAX_LEN, truncation=True
            ).input_ids
            full = tok(prompt).input_ids
            assert len(ids) == MAX_LEN
            agree = {}
            agree["clip_tokenizer_from_vocab_merges"] = (
                from_vocab(prompt, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
                == ids
            )
            if raw is not None:
                agree["tokenizers_from_tokenizer_json"] = raw.encode(prompt).ids == full
            # open_clip's SimpleTokenizer is the original pure-Python CLIP BPE (the "slow" one;
            # transformers 5 no longer ships a slow CLIPTokenizer).
            slow = [49406] + simple.encode(prompt) + [49407]
            agree["open_clip_simple_tokenizer"] = slow == full
            dropped = None
            catcher = WarningCatcher()
            diff_logger.addHandler(catcher)
            try:
                pipe.encode_prompt(prompt, "cpu", 1, False)
            finally:
                diff_logger.removeHandler(catcher)
            if len(full) > MAX_LEN:
                # What diffusers' truncation warning reports: batch_decode of the untruncated ids
                # from model_max_length - 1 up to (not including) the final eos.
                dropped = tok.batch_decode([full[MAX_LEN - 1 : -1]])[0]
                assert len(catcher.messages) == 1 and str([dropped]) in catcher.messages[0], (
                    catcher.messages
                )
            else:
                assert not catcher.messages, catcher.messages
            cases.append(
                {
                    "model": model,
                    "prompt": prompt,
                    "ids": ids,
                    "untruncated_len": len(full),
                    "dropped": dropped,
                    "warning": catcher.messages[0] if catcher.messages else None,
                    "agree": agree,
                }
            )
    return cases


def embedding_cases(pipes, out):
    tensors, cases = {}, []
    for model, pipe in pipes.items():
        for i, prompt in enumerate(EMBED_PROMPTS):
            with torch.no_grad():
                emb, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
            key = f"{model}/{i}"
            tensors[key] = emb.to(torch.float32).contiguous()
            cases.append({"model": model, "prompt": prompt, "key": key, "shape": list(emb.shape)})
    save_file(tensors, out / "embeddings.safetensors")
    return {"file": "embeddings.safetensors", "cases": cases}


def pipeline_case(name, model, scheduler="pndm", karras=False, prompt="a photo of a cat",
                  negative_prompt="", guidance=7.5, steps=6, seed=42, width=64, height=64,
                  num_images=2, latents=None):
    return dict(name=name, model=model, scheduler=scheduler, karras=karras, prompt=prompt,
                negative_prompt=negative_prompt, guidance=guidance, steps=steps, seed=seed,
                width=width, height=height, num_images=num_images, latents=latents)


PIPELINE_CASES = [
    pipeline_case("sd1_pndm", "tiny-sd1", "pndm"),
    pipeline_case("sd1_ddim", "tiny-sd1", "ddim"),
    pipeline_case("sd1_euler", "tiny-sd1", "euler"),
    pipeline_case("sd1_euler_a", "tiny-sd1", "euler-a"),
    pipeline_case("sd1_dpmpp2m", "tiny-sd1", "dpm++2m"),
    pipeline_case("sd1_dpmpp2m_karras", "tiny-sd1", "dpm++2m", karras=True),
    pipeline_case("sd1_euler_karras", "tiny-sd1", "euler", karras=True),
    pipeline_case("sd1_euler_nocfg", "tiny-sd1", "euler", guidance=1.0),
    pipeline_case("sd1_ddim_negative", "tiny-sd1", "ddim", negative_prompt="blurry, ugly"),
    pipeline_case("sd1_euler_64x48", "tiny-sd1", "euler", width=64, height=48),
    pipeline_case("sd2_ddim", "tiny-sd2", "ddim"),
    pipeline_case("sd2_euler_a", "tiny-sd2", "euler-a"),
    pipeline_case("sd2_dpmpp2m_karras", "tiny-sd2", "dpm++2m", karras=True),
    pipeline_case("sd1_euler_given_latents", "tiny-sd1", "euler", num_images=1,
                  latents="init_latents"),
]


def make_scheduler(pipe, default_config, name, karras):
    cls = SCHEDULERS[name]
    extra = {}
    if name == "dpm++2m":
        extra = dict(algorithm_type="dpmsolver++", solver_order=2)
    if karras:
        extra["use_karras_sigmas"] = True
    return cls.from_config(default_config, **extra)


def run_pipeline_cases(pipes, out):
    default_configs = {m: dict(p.scheduler.config) for m, p in pipes.items()}
    # Given latents for the one case that starts from them: unit normal, own seed.
    init = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2024))
    save_file({"latents": init.contiguous()}, out / "init_latents.safetensors")
    np.save(out / "init_latents.npy", init.numpy())

    records = []
    for case in PIPELINE_CASES:
        pipe = pipes[case["model"]]
        pipe.scheduler = make_scheduler(
            pipe, default_configs[case["model"]], case["scheduler"], case["karras"]
        )
        n = case["num_images"]
        lh, lw = case["height"] // 8, case["width"] // 8

        def gens():
            return [torch.Generator("cpu").manual_seed(case["seed"] + i) for i in range(n)]

        # The initial noise diffusers draws: one (1, 4, h/8, w/8) randn per image generator.
        noise = torch.cat([torch.randn((1, 4, lh, lw), generator=g) for g in gens()])
        kwargs = dict(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            guidance_scale=case["guidance"],
            num_inference_steps=case["steps"],
            height=case["height"],
            width=case["width"],
            num_images_per_prompt=n,
        )
        if case["latents"]:
            kwargs["latents"] = init.clone()
        with torch.no_grad():
            latents = pipe(**kwargs, generator=gens(), output_type="latent").images
            timesteps = [float(t) for t in pipe.scheduler.timesteps]
            image = pipe(**kwargs, generator=gens(), output_type="np").images
        image = torch.from_numpy(np.asarray(image, dtype=np.float32))
        image_u8 = (image.numpy() * 255).round().astype("uint8")
        assert torch.isfinite(latents).all() and torch.isfinite(image).all(), case["name"]
        tensors = {
            "latents": latents.to(torch.float32).contiguous(),
            "image": image.contiguous(),
            "image_u8": torch.from_numpy(image_u8).contiguous(),
        }
        if not case["latents"]:
            tensors["noise"] = noise.contiguous()
        file = f"{case['name']}.safetensors"
        save_file(tensors, out / file)
        rec = dict(case)
        rec["latents"] = (
            {"safetensors": "init_latents.safetensors", "npy": "init_latents.npy", "key": "latents"}
            if case["latents"]
            else None
        )
        rec["file"] = file
        rec["tensors"] = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                          for k, v in tensors.items()}
        rec["scheduler_class"] = type(pipe.scheduler).__name__
        # `_use_default_values` is diffusers bookkeeping (a set: its order varies run to run).
        rec["scheduler_config"] = {
            k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"
        }
        rec["timesteps"] = timesteps
        rec["stats"] = {
            "latents_abs_max": float(latents.abs().max()),
            "image_mean": float(image.mean()),
            "image_clipped_fraction": float(((image == 0) | (image == 1)).float().mean()),
        }
        records.append(rec)
        print(f"  {case['name']}: |latents|max {rec['stats']['latents_abs_max']:.3f}, "
              f"image mean {rec['stats']['image_mean']:.3f}, "
              f"clipped {rec['stats']['image_clipped_fraction']:.3f}")
    for m, p in pipes.items():
        p.scheduler = SCHEDULERS["pndm" if m == "tiny-sd1" else "ddim"].from_config(default_configs[m])
    return records


def finite_json(o):
    """Strict JSON has no Infinity/NaN (diffusers' DPM-Solver config holds -inf): write those as
    the strings "inf", "-inf", "nan"."""
    if isinstance(o, float) and not np.isfinite(o):
        return "nan" if np.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_json(v) for v in o]
    return o


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(type(o))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    roots = {"tiny-sd1": args.out / "tiny-sd1", "tiny-sd2": args.out / "tiny-sd2"}
    pipes = {}
    for i, (model, root) in enumerate(roots.items()):
        print(f"building {root}")
        built = build_model(root, sd2=(model == "tiny-sd2"), seed=1000 * (i + 1))
        pipe = load_pipeline(root)
        check_roundtrip(pipe, built)
        pipes[model] = pipe

    golden = args.out / "golden"
    if golden.exists():
        shutil.rmtree(golden)
    golden.mkdir(parents=True)
    print("goldens: tokens")
    tokens = token_cases(pipes, roots, SimpleTokenizer())
    print("goldens: embeddings")
    embeddings = embedding_cases(pipes, golden)
    print("goldens: pipeline runs")
    runs = run_pipeline_cases(pipes, golden)

    cases = {
        "generated_by": "tools/make_tiny_models.py",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "open_clip_torch": open_clip.__version__,
        },
        "notes": [
            "Model dirs are relative to tests/fixtures. Weights are float16 on disk; goldens were "
            "computed in float32 from exactly those values.",
            "Image i of a run uses torch.Generator('cpu').manual_seed(seed + i): its initial noise is "
            "randn((1, 4, height/8, width/8)) from that generator (tensor `noise`), scaled by the "
            "scheduler's init_noise_sigma; ancestral schedulers keep drawing their per-step noise "
            "from the same per-image generator, one (1, 4, height/8, width/8) randn per image per step.",
            "`latents` are the final latents (output_type='latent', before 1/scaling_factor); `image` "
            "is the pipeline's output_type='np' image (NHWC float32 in [0, 1]); `image_u8` is "
            "round(image * 255) as the pipeline saves it.",
            "Non-finite floats in configs are written as the strings \"inf\", \"-inf\", \"nan\" "
            "(strict JSON has no Infinity).",
            "Token ids are the pipeline tokenizer's, padded to max_length with the model's pad token. "
            "`dropped` is the text diffusers' truncation warning reports: batch_decode of the "
            "untruncated ids [model_max_length - 1 : -1], i.e. lowercased, tokens joined with spaces.",
        ],
        "tokens": tokens,
        "embeddings": embeddings,
        "pipeline": runs,
    }
    (golden / "cases.json").write_text(
        json.dumps(
            finite_json(cases), indent=1, ensure_ascii=False, default=json_default, allow_nan=False
        )
        + "\n",
        encoding="utf-8",
    )
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"done: {total / 1e6:.2f} MB under {args.out}")


if __name__ == "__main__":
    main()
