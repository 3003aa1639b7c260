#!/usr/bin/env python3
"""Builds the tiny random-weight SDXL and LCM fixtures and their goldens (SDXL, Turbo, LCM).

Writes, under tests/fixtures/ (or --out):
  tiny-sdxl/  StableDiffusionXLPipeline layout: two CLIP text encoders (the second with a
              projection, keys as the hub's text_encoder_2), two tokenizers (pad <|endoftext|> and
              "!"), an SDXL-style UNet (text_time added embedding, per-block transformer depth),
              a VAE with scaling_factor 0.13025 and force_upcast, SDXL base 1.0's Euler scheduler.
  tiny-lcm/   LatentConsistencyModelPipeline layout (as SimianLuo/LCM_Dreamshaper_v7): tiny-sd1's
              sizes, a UNet with time_cond_proj_dim (guidance embedding), LCMScheduler.
  golden-xl/  cases.json plus safetensors files computed by diffusers from the reloaded folders,
              and the real scheduler_config.json files of sdxl-turbo, sd-turbo, SDXL base 1.0 and
              LCM_Dreamshaper_v7 (for tests that build a model folder with another scheduler).

Weights are drawn from seeded generators (tools/make_tiny_models.py's reinit_), rounded to float16
and stored as float16; goldens are computed in float32 from exactly those values, by pipelines
loaded back from the folders with from_pretrained(..., torch_dtype=float32).

A `xl_taesd` case runs only when tests/fixtures/tiny-taesd/config.json exists (an AutoencoderTiny
made elsewhere); otherwise it is skipped with a note.

Run offline, with a Python (PYTHON, default python3) that has the packages listed in the fixtures README, after tools/make_tiny_models.py (tiny-sd2 is used here):
  HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/make_tiny_sdxl.py
"""

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import open_clip  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from make_tiny_models import (  # noqa: E402
    EOS,
    LONG_PROMPT,
    MAX_LEN,
    WarningCatcher,
    check_roundtrip,
    finite_json,
    half_state_dict,
    json_default,
    load_pipeline,
    reinit_,
    text_config,
    unet_kwargs,
    vae_kwargs,
    write_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# The real scheduler_config.json files, key for key (as on the hub; save_config would add every
# key the class knows with its default). Sources are recorded in cases.json.

# stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
SDXL_BASE_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
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
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# stabilityai/sdxl-turbo/scheduler/scheduler_config.json (EulerAncestral had no
# use_karras_sigmas key in diffusers 0.24).
SDXL_TURBO_SCHEDULER = {
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
}

# stabilityai/sd-turbo/scheduler/scheduler_config.json (plain Euler, not ancestral).
SD_TURBO_SCHEDULER = {
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

# SimianLuo/LCM_Dreamshaper_v7/scheduler/scheduler_config.json. Its PR #7 text (539 bytes) was
# found with steps_offset 0; the current revision (PR #14, "Update scheduler_config.json", also
# 539 bytes) could not be read offline. A same-length edit, and StableDiffusionPipeline's
# deprecation message for steps_offset != 1 (which rewrites it to 1 and asks for a hub PR), point
# to steps_offset 0 -> 1, the value used here. LCMScheduler does not read steps_offset, so the
# goldens do not depend on it. The file has no timestep_scaling: the class default 10.0 applies.
LCM_DREAMSHAPER_V7_SCHEDULER = {
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
    "timestep_spacing": "leading",
    "trained_betas": None,
}

SCHEDULER_FILES = {
    "sdxl_turbo_scheduler_config.json": (
        SDXL_TURBO_SCHEDULER,
        "stabilityai/sdxl-turbo scheduler/scheduler_config.json; text found in two public code "
        "copies (e.g. a vendored SCHEDULER_EULERA_CONFIG_JSON next to the SDXL UNet config) and "
        "consistent with candle PR #1390's description (EulerAncestral, trailing)",
    ),
    "sd_turbo_scheduler_config.json": (
        SD_TURBO_SCHEDULER,
        "stabilityai/sd-turbo scheduler/scheduler_config.json; text from a public test that "
        "embeds the file's bytes ('fetched and verified against the live repo')",
    ),
    "sdxl_base_scheduler_config.json": (
        SDXL_BASE_SCHEDULER,
        "stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json",
    ),
    "lcm_dreamshaper_v7_scheduler_config.json": (
        LCM_DREAMSHAPER_V7_SCHEDULER,
        "SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json: text of its PR #7 revision "
        "(copy in deinferno/LCM_Dreamshaper_v7-openvino, 539 bytes) with steps_offset 1 instead "
        "of 0, inferred for the current revision (PR #14, also 539 bytes, not readable offline); "
        "LCMScheduler ignores steps_offset",
    ),
}

# --------------------------------------------------------------------------------------------
# Architectures

SDXL_UNET_KWARGS = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    attention_head_dim=[2, 4, 4],
    transformer_layers_per_block=[1, 1, 2],
    use_linear_projection=True,
    cross_attention_dim=80,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=88,
    norm_num_groups=8,
)

LCM_TIME_COND_PROJ_DIM = 16


def clip_config(arch, hidden, layers, heads, intermediate, act, projection_dim):
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LEN,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=projection_dim,
        # The legacy ids the real SD/SDXL text_encoder*/config.json files carry. eos_token_id 2
        # makes transformers pool at argmax(input_ids) (the first 49407), as for the real models.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    cfg.architectures = [arch]
    return cfg


def te_state_dict(model):
    """Hub key layout: `text_model.*` (+ `text_projection.weight`); transformers 5 may drop the
    `text_model.` prefix when saving, so the dict is written here."""
    out = {}
    for k, v in half_state_dict(model).items():
        if not (k.startswith("text_model.") or k.startswith("text_projection.")):
            k = "text_model." + k
        out[k] = v
    return out


def save_text_encoder(model, folder, meta):
    model.config.save_pretrained(folder)
    sd = te_state_dict(model)
    save_file(sd, folder / "model.safetensors", meta)
    return sorted(sd)


def build_sdxl(root, seed):
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tokenizer = write_tokenizer(root / "tokenizer", EOS, with_tokenizer_json=False)
    tokenizer_2 = write_tokenizer(root / "tokenizer_2", "!", with_tokenizer_json=False)

    unet = reinit_(UNet2DConditionModel(**SDXL_UNET_KWARGS), seed)
    vae_kw = vae_kwargs(sd2=True)  # scaling_factor 0.13025
    vae = reinit_(AutoencoderKL(**vae_kw, force_upcast=True), seed + 1)
    text_encoder = reinit_(
        CLIPTextModel(clip_config("CLIPTextModel", 32, 3, 4, 64, "quick_gelu", 32)), seed + 2
    )
    text_encoder_2 = reinit_(
        CLIPTextModelWithProjection(
            clip_config("CLIPTextModelWithProjection", 48, 3, 4, 96, "gelu", 40)
        ),
        seed + 3,
    )
    scheduler = EulerDiscreteScheduler.from_config(SDXL_BASE_SCHEDULER)

    meta = {"format": "pt"}
    save_component(unet, root / "unet", meta)
    save_component(vae, root / "vae", meta)
    save_text_encoder(text_encoder, root / "text_encoder", meta)
    keys2 = save_text_encoder(text_encoder_2, root / "text_encoder_2", meta)
    assert "text_projection.weight" in keys2 and "text_projection.bias" not in keys2, keys2
    assert all(k.startswith(("text_model.", "text_projection.")) for k in keys2), keys2
    scheduler.save_config(root / "scheduler")

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_config(root)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}


def save_component(model, dir_, meta):
    """A diffusers component folder: config.json and float16 diffusion_pytorch_model.safetensors."""
    model.save_config(dir_)
    save_file(half_state_dict(model), dir_ / "diffusion_pytorch_model.safetensors", meta)


def build_lcm(root, seed):
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tokenizer = write_tokenizer(root / "tokenizer", EOS, with_tokenizer_json=False)
    unet = reinit_(
        UNet2DConditionModel(**unet_kwargs(sd2=False), time_cond_proj_dim=LCM_TIME_COND_PROJ_DIM),
        seed,
    )
    vae = reinit_(AutoencoderKL(**vae_kwargs(sd2=False)), seed + 1)
    text_encoder = reinit_(CLIPTextModel(text_config(sd2=False)), seed + 2)
    scheduler = LCMScheduler.from_config(LCM_DREAMSHAPER_V7_SCHEDULER)

    meta = {"format": "pt"}
    save_component(unet, root / "unet", meta)
    save_component(vae, root / "vae", meta)
    save_text_encoder(text_encoder, root / "text_encoder", meta)
    scheduler.save_config(root / "scheduler")

    pipe = LatentConsistencyModelPipeline(
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


def load_sdxl(root):
    pipe = StableDiffusionXLPipeline.from_pretrained(
        root, torch_dtype=torch.float32, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_lcm(root):
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        root, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_files_equal_memory(root, built):
    """Every tensor in the folder's safetensors equals the rounded in-memory one (and nothing is
    missing or extra), read straight from the files, not through diffusers."""
    files = {
        "unet": "unet/diffusion_pytorch_model.safetensors",
        "vae": "vae/diffusion_pytorch_model.safetensors",
        "text_encoder": "text_encoder/model.safetensors",
        "text_encoder_2": "text_encoder_2/model.safetensors",
    }
    for name, model in built.items():
        on_disk = load_file(root / files[name])
        expect = te_state_dict(model) if name.startswith("text_encoder") else half_state_dict(model)
        assert set(on_disk) == set(expect), (name, set(on_disk) ^ set(expect))
        for k, v in expect.items():
            assert on_disk[k].dtype == torch.float16, (name, k)
            assert torch.equal(on_disk[k], v), f"{name}.{k} differs on disk"


# --------------------------------------------------------------------------------------------
# Goldens: tokens and embeddings

TOKEN_PROMPTS = ["a photo of a cat", "", "A PHOTO of a Cat!!", LONG_PROMPT]
EMBED_CASES = [
    ("a photo of a cat", ""),
    ("a photo of a cat", "blurry, ugly"),
    (LONG_PROMPT, ""),
    ("", ""),
    # Beyond the brief: negative_prompt None is what pipe(prompt) passes by default; with
    # force_zeros_for_empty_prompt the negative embeddings are then zeros, not the encoding of "".
    ("a photo of a cat", None),
]

SDXL_LOGGER = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"


def token_cases(pipe, root, simple):
    cases = []
    logger = logging.getLogger(SDXL_LOGGER)
    for prompt in TOKEN_PROMPTS:
        catcher = WarningCatcher()
        logger.addHandler(catcher)
        try:
            with torch.no_grad():
                pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
        finally:
            logger.removeHandler(catcher)
        warnings = list(catcher.messages)
        for tok_name in ["tokenizer", "tokenizer_2"]:
            tok = getattr(pipe, tok_name)
            ids = tok(prompt, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
            full = tok(prompt).input_ids
            assert len(ids) == MAX_LEN
            from_vocab = CLIPTokenizer(
                vocab=json.loads((root / tok_name / "vocab.json").read_text(encoding="utf-8")),
                merges=[
                    tuple(m.split(" "))
                    for m in (root / tok_name / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
                ],
                pad_token=tok.pad_token,
            )
            agree = {
                "clip_tokenizer_from_vocab_merges": from_vocab(
                    prompt, padding="max_length", max_length=MAX_LEN, truncation=True
                ).input_ids
                == ids,
                "open_clip_simple_tokenizer": [49406] + simple.encode(prompt) + [49407] == full,
            }
            dropped, warning = None, None
            if len(full) > MAX_LEN:
                dropped = tok.batch_decode([full[MAX_LEN - 1 : -1]])[0]
                # encode_prompt warns once per tokenizer, in order tokenizer, tokenizer_2.
                warning = warnings[0 if tok_name == "tokenizer" else 1]
                assert str([dropped]) in warning, (warning, dropped)
            cases.append(
                {
                    "model": "tiny-sdxl",
                    "tokenizer": tok_name,
                    "pad_token": tok.pad_token,
                    "pad_id": tok.pad_token_id,
                    "prompt": prompt,
                    "ids": ids,
                    "untruncated_len": len(full),
                    "dropped": dropped,
                    "warning": warning,
                    "agree": agree,
                }
            )
        if len(pipe.tokenizer(prompt).input_ids) <= MAX_LEN:
            assert not warnings, warnings
        else:
            assert len(warnings) == 2, warnings
    return cases


def embedding_cases(pipe, out):
    tensors, cases = {}, []
    for i, (prompt, negative) in enumerate(EMBED_CASES):
        with torch.no_grad():
            pe, npe, ppe, nppe = pipe.encode_prompt(
                prompt,
                device="cpu",
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative,
            )
        names = {
            "prompt_embeds": pe,
            "negative_prompt_embeds": npe,
            "pooled_prompt_embeds": ppe,
            "negative_pooled_prompt_embeds": nppe,
        }
        keys = {}
        for n, t in names.items():
            key = f"{i}/{n}"
            tensors[key] = t.to(torch.float32).contiguous()
            keys[n] = {"key": key, "shape": list(t.shape)}
        assert list(pe.shape) == [1, MAX_LEN, 80] and list(ppe.shape) == [1, 40], (pe.shape, ppe.shape)
        cases.append(
            {
                "model": "tiny-sdxl",
                "prompt": prompt,
                "negative_prompt": negative,
                "call": "pipe.encode_prompt(prompt, device='cpu', num_images_per_prompt=1, "
                "do_classifier_free_guidance=True, negative_prompt=negative_prompt)",
                "negative_is_zeros": bool((npe == 0).all() and (nppe == 0).all()),
                "tensors": keys,
            }
        )
    save_file(tensors, out / "embeddings.safetensors")
    return {"file": "embeddings.safetensors", "cases": cases}


# --------------------------------------------------------------------------------------------
# Goldens: pipeline runs


def case(name, model, pipeline, scheduler, *, prompt="a photo of a cat", negative_prompt=None,
         guidance=5.0, steps=6, seed=42, width=64, height=64, num_images=2, extra=None,
         vae=None, note=None):
    return dict(name=name, model=model, pipeline=pipeline, scheduler=scheduler, prompt=prompt,
                negative_prompt=negative_prompt, guidance=guidance, steps=steps, seed=seed,
                width=width, height=height, num_images=num_images, extra=extra or {}, vae=vae,
                note=note)


SIZECOND = dict(
    original_size=(128, 96),
    crops_coords_top_left=(8, 4),
    target_size=(64, 64),
    negative_original_size=(32, 32),
    negative_crops_coords_top_left=(0, 0),
    negative_target_size=(64, 64),
)

INTERLEAVE_NOTE = (
    "diffusers quirk: with CFG, add_time_ids = cat([negative_time_ids, time_ids]).repeat(batch, 1) "
    "gives rows [neg, pos, neg, pos] while the embeddings are [neg, neg, pos, pos]. With "
    "num_images 2 and negative time ids that differ from the positive ones, the UNet pairs the "
    "wrong time ids with half the rows (see unet_time_ids). A faithful implementation gives "
    "different results here; compare xl_sizecond (1 image) instead, or emulate the interleave."
)

PIPELINE_CASES = [
    case("xl_euler", "tiny-sdxl", "sdxl", "own"),
    case("xl_euler_neg_64x48", "tiny-sdxl", "sdxl", "own", negative_prompt="blurry, ugly",
         width=64, height=48),
    case("xl_euler_empty_neg", "tiny-sdxl", "sdxl", "own", negative_prompt="",
         note="negative_prompt \"\" passed explicitly: diffusers encodes the empty text instead of "
              "the zeros force_zeros_for_empty_prompt gives when no negative prompt is passed "
              "(every other case here passes None, the pipeline default)"),
    case("xl_sizecond", "tiny-sdxl", "sdxl", "own", num_images=1, extra=SIZECOND,
         note="1 image, so the diffusers time-id interleave quirk (see xl_sizecond_2img) does not "
              "apply: UNet rows are [negative, positive] for both embeddings and time ids"),
    case("xl_sizecond_2img", "tiny-sdxl", "sdxl", "own", num_images=2, extra=SIZECOND,
         note=INTERLEAVE_NOTE),
    case("xl_turbo_1step", "tiny-sdxl", "sdxl", "sdxl-turbo", guidance=0.0, steps=1,
         num_images=1),
    case("xl_turbo_4step", "tiny-sdxl", "sdxl", "sdxl-turbo", guidance=0.0, steps=4),
    case("xl_lcm_nocfg", "tiny-sdxl", "sdxl", "lcm-from-own", guidance=1.0, steps=4),
    case("xl_lcm_cfg", "tiny-sdxl", "sdxl", "lcm-from-own", guidance=2.0, steps=4),
    case("xl_dpmpp2m_karras", "tiny-sdxl", "sdxl", "dpm++2m-karras-from-own"),
    case("lcm_model", "tiny-lcm", "lcm", "own", negative_prompt=None, guidance=8.0, steps=4),
    case("sd2_turbo_1step", "tiny-sd2", "sd", "sd-turbo", guidance=0.0, steps=1, num_images=1),
    case("sd2_turbo_2step", "tiny-sd2", "sd", "sd-turbo", guidance=0.0, steps=2, num_images=1),
    case("xl_taesd", "tiny-sdxl", "sdxl", "own", steps=4, vae="tiny-taesd"),
]

SCHEDULER_SOURCES = {
    "own": "the model folder's scheduler/scheduler_config.json",
    "sdxl-turbo": "EulerAncestralDiscreteScheduler.from_config(golden-xl/sdxl_turbo_scheduler_config.json)",
    "sd-turbo": "EulerDiscreteScheduler.from_config(golden-xl/sd_turbo_scheduler_config.json)",
    "lcm-from-own": "LCMScheduler.from_config(model's scheduler config), as LCM-LoRA users switch",
    "dpm++2m-karras-from-own": "DPMSolverMultistepScheduler.from_config(model's scheduler config, "
    "algorithm_type='dpmsolver++', solver_order=2, use_karras_sigmas=True)",
}


def make_scheduler(kind, own_config):
    if kind == "own":
        cls = getattr(diffusers, own_config["_class_name"])
        return cls.from_config(own_config)
    if kind == "sdxl-turbo":
        return EulerAncestralDiscreteScheduler.from_config(SDXL_TURBO_SCHEDULER)
    if kind == "sd-turbo":
        return EulerDiscreteScheduler.from_config(SD_TURBO_SCHEDULER)
    if kind == "lcm-from-own":
        return LCMScheduler.from_config(own_config)
    if kind == "dpm++2m-karras-from-own":
        return DPMSolverMultistepScheduler.from_config(
            own_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    raise ValueError(kind)


class UnetRecorder:
    """Forward pre-hook: what the UNet receives (first call in full, t of every call)."""

    def __init__(self, unet):
        self.first = None
        self.timesteps = []
        self.batch = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.timesteps.append(float(t))
        self.batch.append(int(sample.shape[0]))
        if self.first is None:
            added = kwargs.get("added_cond_kwargs") or {}
            self.first = {
                "sample": sample.detach().clone(),
                "time_ids": added.get("time_ids"),
                "text_embeds": added.get("text_embeds"),
                "timestep_cond": kwargs.get("timestep_cond"),
            }
            self.first = {k: (v.detach().clone() if v is not None else None)
                          for k, v in self.first.items()}

    def remove(self):
        self.handle.remove()


def tensor_stats(latents, image):
    return {
        "latents_abs_max": float(latents.abs().max()),
        "latents_std": float(latents.std()),
        "image_mean": float(image.mean()),
        "image_std": float(image.std()),
        "image_clipped_fraction": float(((image == 0) | (image == 1)).float().mean()),
        "images_max_abs_diff": float((image[0] - image[-1]).abs().max()) if image.shape[0] > 1 else None,
    }


def run_pipeline_cases(pipes, fixtures, out, notes):
    own_configs = {m: {k: v for k, v in p.scheduler.config.items() if k != "_use_default_values"}
                   for m, p in pipes.items()}
    records = []
    taesd_dir = fixtures / "tiny-taesd"
    for c in PIPELINE_CASES:
        if c["vae"] == "tiny-taesd" and not (taesd_dir / "config.json").exists():
            msg = (f"case {c['name']} skipped: {taesd_dir.relative_to(fixtures)}/config.json does "
                   "not exist (re-run this script once the AutoencoderTiny fixture is there)")
            print("  NOTE: " + msg)
            notes.append(msg)
            continue
        base = pipes[c["model"]]
        components = dict(base.components)
        if c["vae"] == "tiny-taesd":
            components["vae"] = AutoencoderTiny.from_pretrained(taesd_dir, torch_dtype=torch.float32)
        components["scheduler"] = make_scheduler(c["scheduler"], own_configs[c["model"]])
        if c["pipeline"] == "sdxl":
            init_extra = {"force_zeros_for_empty_prompt": True, "add_watermarker": False}
        else:
            init_extra = {"requires_safety_checker": False}
        pipe = type(base)(**components, **init_extra)
        pipe.set_progress_bar_config(disable=True)

        n = c["num_images"]
        lh, lw = c["height"] // 8, c["width"] // 8

        def gens():
            return [torch.Generator("cpu").manual_seed(c["seed"] + i) for i in range(n)]

        noise = torch.cat([torch.randn((1, 4, lh, lw), generator=g) for g in gens()])
        kwargs = dict(
            prompt=c["prompt"],
            guidance_scale=c["guidance"],
            num_inference_steps=c["steps"],
            height=c["height"],
            width=c["width"],
            num_images_per_prompt=n,
        )
        if c["pipeline"] != "lcm":  # LatentConsistencyModelPipeline takes no negative prompt
            kwargs["negative_prompt"] = c["negative_prompt"]
        kwargs.update(c["extra"])

        rec_unet = UnetRecorder(pipe.unet)
        with torch.no_grad():
            latents = pipe(**kwargs, generator=gens(), output_type="latent").images
        rec_unet.remove()
        timesteps = [float(t) for t in pipe.scheduler.timesteps]
        do_cfg = bool(pipe.do_classifier_free_guidance)
        with torch.no_grad():
            image = pipe(**kwargs, generator=gens(), output_type="np").images
        image = torch.from_numpy(np.asarray(image, dtype=np.float32))
        image_u8 = (image.numpy() * 255).round().astype("uint8")
        latents = latents.to(torch.float32)
        assert torch.isfinite(latents).all() and torch.isfinite(image).all(), c["name"]

        first = rec_unet.first
        tensors = {
            "noise": noise.contiguous(),
            "latents": latents.contiguous(),
            "image": image.contiguous(),
            "image_u8": torch.from_numpy(image_u8).contiguous(),
        }
        if first["time_ids"] is not None:
            tensors["unet_time_ids"] = first["time_ids"].to(torch.float32).contiguous()
            tensors["unet_text_embeds"] = first["text_embeds"].to(torch.float32).contiguous()
        if first["timestep_cond"] is not None:
            tensors["unet_timestep_cond"] = first["timestep_cond"].to(torch.float32).contiguous()

        # The first UNet input is the noise scaled by init_noise_sigma, then scale_model_input.
        s0 = make_scheduler(c["scheduler"], own_configs[c["model"]])
        s0.set_timesteps(c["steps"])
        expect0 = s0.scale_model_input(noise * s0.init_noise_sigma, s0.timesteps[0])
        if do_cfg:
            expect0 = torch.cat([expect0] * 2)
        assert torch.allclose(first["sample"], expect0, atol=1e-6, rtol=1e-5), c["name"]

        extra_rec = {}
        if c["pipeline"] == "lcm":
            # The same components through StableDiffusionPipeline: no CFG either (the UNet has
            # time_cond_proj_dim), same guidance embedding, same per-step noise; its last latents
            # are the LCM scheduler's last `denoised`, which the LCM pipeline returns.
            sd = StableDiffusionPipeline(**{k: v for k, v in components.items()
                                            if k != "image_encoder"},
                                         requires_safety_checker=False)
            sd.scheduler = make_scheduler(c["scheduler"], own_configs[c["model"]])
            sd.set_progress_bar_config(disable=True)
            with torch.no_grad():
                sd_latents = sd(**kwargs, generator=gens(), output_type="latent").images
            diff = float((sd_latents - latents).abs().max())
            extra_rec["stable_diffusion_pipeline_check"] = {
                "pipeline": "StableDiffusionPipeline (same components, same call arguments)",
                "latents_equal": bool(torch.equal(sd_latents, latents)),
                "latents_max_abs_diff": diff,
            }
            assert diff < 1e-5, diff

        file = f"{c['name']}.safetensors"
        save_file(tensors, out / file)
        call_args = dict(kwargs)
        call_args["generator"] = (f"[torch.Generator('cpu').manual_seed({c['seed']} + i) "
                                  f"for i in range({n})]")
        call_args["output_type"] = "'latent' for latents, 'np' for image"
        rec = {
            "name": c["name"],
            "model": c["model"],
            "pipeline_class": type(pipe).__name__,
            "vae": c["vae"] or f"{c['model']}/vae",
            "vae_class": type(pipe.vae).__name__,
            "scheduler": c["scheduler"],
            "scheduler_source": SCHEDULER_SOURCES[c["scheduler"]],
            "scheduler_class": type(pipe.scheduler).__name__,
            "scheduler_config": {k: v for k, v in pipe.scheduler.config.items()
                                 if k != "_use_default_values"},
            "prompt": c["prompt"],
            "negative_prompt": c["negative_prompt"] if c["pipeline"] != "lcm" else None,
            "guidance": c["guidance"],
            "steps": c["steps"],
            "seed": c["seed"],
            "width": c["width"],
            "height": c["height"],
            "num_images": n,
            "call_args": call_args,
            "do_classifier_free_guidance": do_cfg,
            "init_noise_sigma": float(s0.init_noise_sigma),
            "timesteps": timesteps,
            "unet_calls": len(rec_unet.timesteps),
            "unet_timesteps": rec_unet.timesteps,
            "unet_batch": rec_unet.batch[0],
            "time_ids": first["time_ids"].tolist() if first["time_ids"] is not None else None,
            "file": file,
            "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                        for k, v in tensors.items()},
            "note": c["note"],
        }
        rec.update(extra_rec)
        rec["stats"] = tensor_stats(latents, image)
        st = rec["stats"]
        problems = []
        if not (st["image_std"] > 0.02 and st["image_clipped_fraction"] < 0.5):
            problems.append("flat or mostly clipped image")
        if n > 1 and not st["images_max_abs_diff"] > 1e-3:
            problems.append("the images of different seeds are equal")
        if problems:
            # Fail on this script's own models; only warn for a VAE made elsewhere (tiny-taesd).
            assert c["vae"] is not None, (c["name"], problems, st)
            print(f"  WARNING {c['name']}: {', '.join(problems)}")
            rec["stats"]["warning"] = ", ".join(problems)
        records.append(rec)
        print(f"  {c['name']}: {rec['scheduler_class']} t={[round(t, 2) for t in timesteps]} "
              f"cfg={do_cfg} |lat|max {st['latents_abs_max']:.3f} lat std {st['latents_std']:.3f} "
              f"img mean {st['image_mean']:.3f} std {st['image_std']:.3f} "
              f"clipped {st['image_clipped_fraction']:.3f}"
              + (f" time_ids {rec['time_ids']}" if rec["time_ids"] else ""))
    return records


def dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    fixtures = args.out

    sd2_root = fixtures / "tiny-sd2"
    assert (sd2_root / "model_index.json").exists(), "run tools/make_tiny_models.py first"

    roots = {"tiny-sdxl": fixtures / "tiny-sdxl", "tiny-lcm": fixtures / "tiny-lcm"}
    print(f"building {roots['tiny-sdxl']}")
    built = build_sdxl(roots["tiny-sdxl"], seed=3000)
    check_files_equal_memory(roots["tiny-sdxl"], built)
    sdxl = load_sdxl(roots["tiny-sdxl"])
    check_roundtrip(sdxl, built)
    assert sdxl.config.force_zeros_for_empty_prompt is True

    print(f"building {roots['tiny-lcm']}")
    built = build_lcm(roots["tiny-lcm"], seed=4000)
    check_files_equal_memory(roots["tiny-lcm"], built)
    lcm = load_lcm(roots["tiny-lcm"])
    check_roundtrip(lcm, built)

    pipes = {"tiny-sdxl": sdxl, "tiny-lcm": lcm, "tiny-sd2": load_pipeline(sd2_root)}

    golden = fixtures / "golden-xl"
    if golden.exists():
        shutil.rmtree(golden)
    golden.mkdir(parents=True)
    scheduler_files = {}
    for fname, (cfg, source) in SCHEDULER_FILES.items():
        (golden / fname).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        scheduler_files[fname] = {"source": source, "class": cfg["_class_name"]}

    notes = [
        "Model dirs are relative to tests/fixtures. Weights are float16 on disk; goldens were "
        "computed in float32 from exactly those values, by pipelines loaded back from the folders.",
        "Image i of a run uses torch.Generator('cpu').manual_seed(seed + i): its initial noise is "
        "randn((1, 4, height/8, width/8)) from that generator (tensor `noise`), scaled by the "
        "scheduler's init_noise_sigma. Euler a and LCM (multi-step) keep drawing their per-step "
        "noise from the same per-image generators, one (1, 4, height/8, width/8) randn per image "
        "per step (LCM: after every step but the last).",
        "`latents` are the final latents (output_type='latent', before 1/scaling_factor; for "
        "LatentConsistencyModelPipeline the last step's `denoised`, which equals the scheduler's "
        "last prev_sample); `image` is the pipeline's output_type='np' image (NHWC float32 in "
        "[0, 1]); `image_u8` is round(image * 255).",
        "unet_time_ids / unet_text_embeds / unet_timestep_cond are the UNet's added_cond_kwargs "
        "['time_ids'] / ['text_embeds'] and timestep_cond at its first call (batch rows as the "
        "UNet sees them: with CFG the first half of the rows is the unconditional batch). "
        "`time_ids` in the case record is the same tensor as a list. unet_timesteps is the "
        "timestep passed to every UNet call.",
        "SDXL time ids are (original_size h, w, crop top, left, target_size h, w); diffusers' "
        "defaults are original_size = target_size = (height, width), crops (0, 0), and the "
        "negative ones default to the positive ones.",
        "SDXL prompt_embeds = concat(text_encoder hidden_states[-2], text_encoder_2 "
        "hidden_states[-2]) on the feature axis (32 + 48 = 80; no final layer norm); pooled = "
        "text_encoder_2's text_embeds (final layer norm at the argmax(input_ids) token, then "
        "text_projection, no bias).",
        "force_zeros_for_empty_prompt applies only when negative_prompt is None (the pipeline "
        "default), whatever the prompt: then the negative embeddings and pooled embeddings are "
        "zeros. A negative_prompt of \"\" is encoded like any text.",
        "Non-finite floats in configs are written as the strings \"inf\", \"-inf\", \"nan\".",
    ]

    print("goldens: tokens")
    tokens = token_cases(sdxl, roots["tiny-sdxl"], SimpleTokenizer())
    print("goldens: embeddings")
    embeddings = embedding_cases(sdxl, golden)
    for e in embeddings["cases"]:
        print(f"  {e['prompt'][:30]!r} / {e['negative_prompt']!r}: negative zeros "
              f"{e['negative_is_zeros']}")
    print("goldens: pipeline runs")
    runs = run_pipeline_cases(pipes, fixtures, golden, notes)

    cases = {
        "generated_by": "tools/make_tiny_sdxl.py",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "open_clip_torch": open_clip.__version__,
        },
        "notes": notes,
        "scheduler_files": scheduler_files,
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
    for name in ["tiny-sdxl", "tiny-lcm", "golden-xl"]:
        print(f"  {name}: {dir_bytes(fixtures / name) / 1e6:.2f} MB")
    total = sum(dir_bytes(fixtures / n) for n in ["tiny-sdxl", "tiny-lcm", "golden-xl"])
    print(f"done: {total / 1e6:.2f} MB written")


if __name__ == "__main__":
    main()
