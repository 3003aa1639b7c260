#!/usr/bin/env python3
"""Builds a full-size Stable Diffusion XL base 1.0 with random weights, for benchmarks.

Same architecture, sizes and folder layout as stabilityai/stable-diffusion-xl-base-1.0 (UNet 2.57B,
CLIP ViT-L text 123.1M, OpenCLIP bigG text + projection 694.7M, VAE 83.7M parameters), so compute
and memory equal the real model's. The config files are the real ones, key for key; the two
tokenizer folders are the real CLIP vocabulary rebuilt offline (copied from tests/fixtures: tiny-sd1
pads with <|endoftext|> like CLIP-L's, tiny-sd2 pads with "!" like tokenizer_2's).

Weights are drawn from seeded generators (normal, std 1/sqrt(fan_in); norm scales 1 + N(0, 0.1^2)
and shifts N(0, 0.1^2), so a missing norm shows up in parity) and stored as float16 safetensors.
Each file is streamed tensor by tensor from the module's shapes (built on the meta device), so the
build holds one tensor at a time (peak RSS ~1.4 GB with the final load-back check), never the
10 GB of an fp32 SDXL UNet; about a minute on 2 cores.

    HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/make_random_sdxl.py OUT_DIR [--vae-tiny TINY_DIR]

--vae-tiny also writes a random-weight AutoencoderTiny with TAESDXL's real config, in the
madebyollin/taesdxl layout (config.json + diffusion_pytorch_model.safetensors at the root);
--only-vae-tiny writes just that. tools/make_random_turbo.py reuses the helpers here.
"""
import argparse
import json
import os
import shutil
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"

# ---- the real configs of stabilityai/stable-diffusion-xl-base-1.0 ---------------------------------

SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
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
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.20.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SDXL_SCHEDULER = {
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


def clip_text_config(arch, hidden, layers, heads, intermediate, act, projection_dim, version):
    """A text_encoder/config.json as the hub SD repos ship it (bos 0 / eos 2 / pad 1 are the
    legacy PretrainedConfig values those files carry; the tokenizer holds the real ids)."""
    return {
        "architectures": [arch],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection_dim,
        "torch_dtype": "float16",
        "transformers_version": version,
        "vocab_size": 49408,
    }


SDXL_TEXT_ENCODER = clip_text_config("CLIPTextModel", 768, 12, 12, 3072, "quick_gelu", 768, "4.32.0.dev0")
SDXL_TEXT_ENCODER_2 = clip_text_config("CLIPTextModelWithProjection", 1280, 32, 20, 5120, "gelu", 1280,
                                       "4.32.0.dev0")

# madebyollin/taesd and madebyollin/taesdxl: the same architecture and config.
TAESD = {
    "_class_name": "AutoencoderTiny",
    "_diffusers_version": "0.20.0.dev0",
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}

# ---- helpers ---------------------------------------------------------------------------------------


def random_tensor(name, shape, g):
    """One parameter: norms near 1 / 0, everything else N(0, 1/fan_in); float16."""
    shape = tuple(shape)
    if len(shape) == 1 and "norm" in name:
        t = torch.randn(shape, generator=g) * 0.1
        if name.endswith("weight"):
            t += 1
    else:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        if len(shape) == 1:
            fan_in = shape[0]
        t = torch.randn(shape, generator=g) / max(fan_in, 1) ** 0.5
    return t.to(torch.float16)


def write_random_safetensors(path, shapes, seed):
    """Streams a float16 safetensors file of random tensors with these names and shapes, one tensor
    in memory at a time. Tensors are laid out (and drawn) in sorted name order."""
    names = sorted(shapes)
    header, offset = {}, 0
    for n in names:
        size = 2
        for d in shapes[n]:
            size *= d
        header[n] = {"dtype": "F16", "shape": list(shapes[n]), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            f.write(random_tensor(n, shapes[n], g).numpy().tobytes())
    return sum(_numel(s) for s in shapes.values())


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def meta_shapes(build):
    """Parameter names and shapes of the module `build()` makes, without allocating it."""
    with init_empty_weights():
        m = build()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_diffusers_model(folder, cls, config, seed):
    """A diffusers model folder: config.json (the given dict, verbatim) + random weights."""
    cfg = {k: v for k, v in config.items()}
    shapes = meta_shapes(lambda: cls.from_config(cfg))
    write_json(folder / "config.json", config)
    n = write_random_safetensors(folder / "diffusion_pytorch_model.safetensors", shapes, seed)
    print(f"  {folder.name}: {cls.__name__} {n / 1e6:.1f}M params")
    return n


def write_text_encoder(folder, config, seed):
    """A transformers CLIPTextModel / CLIPTextModelWithProjection folder with the hub's key layout
    (`text_model.` prefix; `text_projection.weight` at the root)."""
    import transformers
    from transformers import CLIPTextConfig

    cls = getattr(transformers, config["architectures"][0])
    cfg = CLIPTextConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    shapes = meta_shapes(lambda: cls(cfg))
    shapes = {(k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v
              for k, v in shapes.items()}
    write_json(folder / "config.json", config)
    n = write_random_safetensors(folder / "model.safetensors", shapes, seed)
    print(f"  {folder.name}: {cls.__name__} {n / 1e6:.1f}M params")
    return n


def copy_tokenizer(src_fixture, dst):
    """The real CLIP BPE (vocab.json + merges.txt + the two small configs), as hub SD repos ship it."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copyfile(FIXTURES / src_fixture / "tokenizer" / name, dst / name)
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(dst)("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids


def write_tiny_vae(folder, seed, name):
    from diffusers import AutoencoderTiny

    folder.mkdir(parents=True, exist_ok=True)
    write_diffusers_model(folder, AutoencoderTiny, TAESD, seed)
    print(f"wrote {folder} ({name} layout)")


def check_pipeline(folder):
    """Loads the folder back with diffusers (the weights stay memory-mapped: no full copy)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in pipe.components.items()
              if isinstance(m, torch.nn.Module)}
    print(f"  loaded back as {type(pipe).__name__}: " +
          ", ".join(f"{n} {c / 1e6:.1f}M" for n, c in sorted(counts.items())))
    del pipe


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=str(REPO.parent / "sdxl-random"))
    ap.add_argument("--vae-tiny", metavar="DIR", help="also write a random TAESDXL (AutoencoderTiny) here")
    ap.add_argument("--only-vae-tiny", action="store_true", help="write only the --vae-tiny folder")
    ap.add_argument("--no-check", action="store_true", help="skip loading the result back with diffusers")
    a = ap.parse_args()

    if a.vae_tiny:
        write_tiny_vae(Path(a.vae_tiny), 20, "madebyollin/taesdxl")
    if a.only_vae_tiny:
        return

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_diffusers_model(out / "unet", UNet2DConditionModel, SDXL_UNET, 11)
    write_diffusers_model(out / "vae", AutoencoderKL, SDXL_VAE, 12)
    write_text_encoder(out / "text_encoder", SDXL_TEXT_ENCODER, 13)
    write_text_encoder(out / "text_encoder_2", SDXL_TEXT_ENCODER_2, 14)
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)  # the file must build
    write_json(out / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER)
    copy_tokenizer("tiny-sd1", out / "tokenizer")
    copy_tokenizer("tiny-sd2", out / "tokenizer_2")
    write_json(out / "model_index.json", SDXL_MODEL_INDEX)
    if not a.no_check:
        check_pipeline(out)
    print("wrote", out)


if __name__ == "__main__":
    main()
