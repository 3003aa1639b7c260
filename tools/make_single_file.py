"""Single-file checkpoints of the tiny fixtures: tests/fixtures/single-file/.

Writes each tiny diffusers model (tests/fixtures/tiny-sd1, tiny-sd2, tiny-sdxl) in the original
LDM key layout that AUTOMATIC1111, ComfyUI and model-sharing sites use:
  model.diffusion_model.*                 UNet (input_blocks / middle_block / output_blocks)
  first_stage_model.*                     VAE (encoder.down.N.block.M, mid.attn_1 as 1x1 convs)
  cond_stage_model.transformer.*          SD 1.x CLIP (transformers names)
  cond_stage_model.model.*                SD 2.x OpenCLIP (fused attn.in_proj, ln_1, c_fc, ...),
                                          with one more resblock than the model reads and a
                                          text_projection, as real SD 2.x files have
  conditioner.embedders.0.transformer.*   SDXL CLIP ViT-L
  conditioner.embedders.1.model.*         SDXL OpenCLIP bigG (text_projection stored as x @ P)
plus the DDPM schedule buffers real checkpoints carry (betas, alphas_cumprod, ...). Tensors keep
the folder's dtype (float16) and values, so a model loaded from the file must equal the folder's
bit for bit.

Then checks the files with diffusers itself: `from_single_file(file, config=folder)` must give
every component's state dict equal to `from_pretrained(folder)`'s.

With --full-sd15 DIR it also writes a random-weight SD 1.5 (the real architecture, 2 GB in
float16) as DIR/sd15 (a diffusers folder) and DIR/sd15.safetensors, for the load-time benchmark.

Run from the repository root: "${PYTHON:-python3}" tools/make_single_file.py [--full-sd15 DIR]
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "tests" / "fixtures"
OUT = FX / "single-file"

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def rename_tail(tail, table):
    for new, old in table:
        if tail.startswith(new + "."):
            return old + tail[len(new):]
    raise KeyError(tail)


def unet_to_ldm(sd, config, src):
    out = {}
    layers = config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    n = len(down_attn)
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for key, value in sd.items():
        parts = key.split(".")
        new = None
        for d, l in fixed.items():
            if key.startswith(d + "."):
                new = l + key[len(d):]
        if new is None and parts[0] == "down_blocks":
            b, kind, j = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            i = 1 + b * (layers + 1) + j
            if kind == "resnets":
                new = f"input_blocks.{i}.0.{rename_tail(rest, RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{i}.1.{rest}"
            elif kind == "downsamplers":
                new = f"input_blocks.{1 + b * (layers + 1) + layers}.0.op.{'.'.join(parts[5:])}"
        elif new is None and parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * j}.{rename_tail(rest, RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif new is None and parts[0] == "up_blocks":
            u, kind, j = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            i = u * (layers + 1) + j
            if kind == "resnets":
                new = f"output_blocks.{i}.0.{rename_tail(rest, RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{i}.1.{rest}"
            elif kind == "upsamplers":
                slot = 2 if down_attn[n - 1 - u] else 1
                new = f"output_blocks.{u * (layers + 1) + layers}.{slot}.conv.{'.'.join(parts[5:])}"
        if new is None:
            raise KeyError(key)
        out["model.diffusion_model." + new] = ("same", [(src, key)])
    return out


VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
            ("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out")]


def vae_to_ldm(sd, config, src):
    out = {}
    n = len(config["block_out_channels"])
    for key, value in sd.items():
        new = key
        op = "same"
        for coder in ("encoder", "decoder"):
            if not key.startswith(coder + "."):
                continue
            rest = key[len(coder) + 1:]
            parts = rest.split(".")
            if parts[0] in ("down_blocks", "up_blocks"):
                i = int(parts[1])
                level = i if coder == "encoder" else n - 1 - i
                what = "down" if coder == "encoder" else "up"
                if parts[2] == "resnets":
                    tail = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                    new = f"{coder}.{what}.{level}.block.{parts[3]}.{tail}"
                else:
                    sampler = "downsample" if coder == "encoder" else "upsample"
                    new = f"{coder}.{what}.{level}.{sampler}.conv.{'.'.join(parts[5:])}"
            elif parts[0] == "mid_block":
                if parts[1] == "resnets":
                    tail = ".".join(parts[3:]).replace("conv_shortcut", "nin_shortcut")
                    new = f"{coder}.mid.block_{int(parts[2]) + 1}.{tail}"
                else:
                    tail = ".".join(parts[3:])
                    new = f"{coder}.mid.attn_1.{rename_tail(tail, VAE_ATTN)}"
                    if value.dim() == 2:
                        op = "conv"
            elif parts[0] == "conv_norm_out":
                new = f"{coder}.norm_out.{'.'.join(parts[1:])}"
        out["first_stage_model." + new] = (op, [(src, key)])
    return out


OPEN_CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def open_clip(sd, prefix, src, extras, generator):
    """OpenCLIP names for a transformers CLIP state dict; with `extras` (a dict to fill), the
    last layer and projection real SD 2.x files carry, random, which nothing may read."""
    out = {}
    tm = "text_model."
    same = lambda key: ("same", [(src, key)])  # noqa: E731
    out[prefix + "token_embedding.weight"] = same(tm + "embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = same(tm + "embeddings.position_embedding.weight")
    out[prefix + "ln_final.weight"] = same(tm + "final_layer_norm.weight")
    out[prefix + "ln_final.bias"] = same(tm + "final_layer_norm.bias")
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(tm + "encoder.layers.")})
    for l in layers:
        base = f"{tm}encoder.layers.{l}."
        block = f"{prefix}transformer.resblocks.{l}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = (
                "cat", [(src, base + f"self_attn.{p}_proj.{kind}") for p in "qkv"])
        for key in sd:
            if key.startswith(base) and not any(f".{p}_proj." in key for p in "qkv"):
                out[block + rename_tail(key[len(base):], OPEN_CLIP_LAYER)] = same(key)
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = ("t", [(src, "text_projection.weight")])
    if extras is not None:
        dtype = sd[tm + "final_layer_norm.weight"].dtype
        hidden = sd[tm + "final_layer_norm.weight"].shape[0]
        last = f"{prefix}transformer.resblocks.{len(layers) - 1}."
        extra = f"{prefix}transformer.resblocks.{len(layers)}."
        shapes = {}
        for key, (op, sources) in out.items():
            if key.startswith(last):
                shapes[extra + key[len(last):]] = sum(sd[k].shape[0] for _, k in sources), sd[sources[0][1]].shape[1:]
        for key, (rows, rest) in sorted(shapes.items()):
            extras[key] = torch.randn((rows, *rest), generator=generator, device="cpu").to(dtype)
        extras[prefix + "text_projection"] = torch.randn(hidden, hidden, generator=generator, device="cpu").to(dtype)
    return out


def schedule_buffers(dtype):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64, device="cpu") ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {"betas": betas.to(dtype), "alphas_cumprod": alphas_cumprod.to(dtype),
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt().to(dtype)}


UNET_FILE, VAE_FILE = "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"
TE_FILE, TE2_FILE = "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"


def recipe(folder, kind):
    """How each tensor of the single file is made: {name: (op, [(file in folder, tensor)])}
    with op same / cat (rows) / t (transposed) / conv (a matrix as a 1x1 convolution), and
    the tensors not in the folder (extras)."""
    folder = Path(folder)
    files = [UNET_FILE, VAE_FILE, TE_FILE] + ([TE2_FILE] if kind == "sdxl" else [])
    sds = {f: load_file(folder / f) for f in files}
    configs = {c: json.loads((folder / c / "config.json").read_text()) for c in ("unet", "vae")}
    return recipe_from(sds, configs, kind)


def recipe_from(sds, configs, kind):
    """The recipe of state dicts `sds` (by file) with the unet and vae `configs`."""
    g = torch.Generator().manual_seed(5)
    out = unet_to_ldm(sds[UNET_FILE], configs["unet"], UNET_FILE)
    out.update(vae_to_ldm(sds[VAE_FILE], configs["vae"], VAE_FILE))
    te = sds[TE_FILE]
    extras = schedule_buffers(next(iter(sds[UNET_FILE].values())).dtype)
    if kind == "sd1":
        out.update({"cond_stage_model.transformer." + k: ("same", [(TE_FILE, k)]) for k in te})
    elif kind == "sd2":
        out.update(open_clip(te, "cond_stage_model.model.", TE_FILE, extras, g))
    else:
        out.update({"conditioner.embedders.0.transformer." + k: ("same", [(TE_FILE, k)]) for k in te})
        out.update(open_clip(sds[TE2_FILE], "conditioner.embedders.1.model.", TE2_FILE, None, g))
    return out, extras


def layouts():
    """Names and shapes of full-size SD 1.5, SD 2.1 and SDXL base checkpoints in the LDM layout
    (models built on the meta device from the templates: no weights), for the inference test."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    templates = ROOT / "src" / "model" / "single_file" / "templates"
    load = lambda name: json.loads((templates / name).read_text())  # noqa: E731
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    clip = lambda d: CLIPTextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})  # noqa: E731
    big_g = dict(load("text_open_clip.json"), hidden_size=1280, intermediate_size=5120,
                 num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)
    out = {}
    for kind, unet_t, encoders in [
        ("sd1", "unet_sd1.json", [(CLIPTextModel, load("text_clip.json"))]),
        ("sd2", "unet_sd2.json", [(CLIPTextModel, load("text_open_clip.json"))]),
        ("sdxl", "unet_sdxl.json", [(CLIPTextModel, load("text_clip.json")),
                                    (CLIPTextModelWithProjection, big_g)]),
    ]:
        with torch.device("meta"):
            unet_cfg, vae_cfg = strip(load(unet_t)), strip(load("vae.json"))
            sds = {UNET_FILE: UNet2DConditionModel(**unet_cfg).half().state_dict(),
                   VAE_FILE: AutoencoderKL(**vae_cfg).half().state_dict()}
            for file, (cls, cfg) in zip([TE_FILE, TE2_FILE], encoders):
                model = cls(clip(cfg)).half()
                sd = model.state_dict()
                if not any(k.startswith("text_model.") for k in sd):
                    sd = {("text_projection.weight" if k.startswith("text_projection") else "text_model." + k): v
                          for k, v in sd.items()}
                sds[file] = sd
            steps, extras = recipe_from(sds, {"unet": unet_cfg, "vae": vae_cfg}, kind)
            tensors = {n: list(v.shape) for n, v in extras.items()}
            for name, (op, sources) in steps.items():
                shapes = [list(sds[f][k].shape) for f, k in sources]
                shape = shapes[0]
                if op == "cat":
                    shape = [sum(s[0] for s in shapes)] + shape[1:]
                elif op == "t":
                    shape = shape[::-1]
                elif op == "conv":
                    shape = shape + [1, 1]
                tensors[name] = shape
        out[kind] = sorted(tensors.items())
        print(f"layout of a full-size {kind} checkpoint: {len(tensors)} tensors")
    (OUT / "layouts.json").write_text(json.dumps(out, separators=(",", ":")) + "\n")


def assemble(folder, steps, extras):
    """The single file's tensors from the recipe (tests/common/single_file.rs does the same)."""
    files = {}
    out = dict(extras)
    for name, (op, sources) in steps.items():
        parts = []
        for rel, key in sources:
            if rel not in files:
                files[rel] = load_file(Path(folder) / rel)
            parts.append(files[rel][key])
        if op == "same":
            out[name] = parts[0]
        elif op == "cat":
            out[name] = torch.cat(parts)
        elif op == "t":
            out[name] = parts[0].t()
        elif op == "conv":
            out[name] = parts[0][:, :, None, None]
        else:
            raise ValueError(op)
    return {k: v.contiguous() for k, v in out.items()}


def to_single_file(folder, kind):
    steps, extras = recipe(folder, kind)
    return assemble(folder, steps, extras)


def check_with_diffusers(path, folder, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    ref = cls.from_pretrained(folder, torch_dtype=torch.float16, **extra)
    single = cls.from_single_file(str(path), config=str(folder), local_files_only=True,
                                  torch_dtype=torch.float16, **extra)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    for name in names:
        a = getattr(ref, name).state_dict()
        b = getattr(single, name).state_dict()
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
        assert a.keys() == b.keys(), (name, sorted(a.keys() ^ b.keys())[:5])
        for k in a:
            assert torch.equal(a[k], b[k]), (path.name, name, k)
        print(f"  {path.name}: diffusers from_single_file {name}: {len(a)} tensors equal")


def full_sd15(out_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    templates = ROOT / "src" / "model" / "single_file" / "templates"
    out_dir = Path(out_dir)
    folder = out_dir / "sd15"
    torch.manual_seed(0)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    unet_cfg = strip(json.loads((templates / "unet_sd1.json").read_text()))
    vae_cfg = strip(json.loads((templates / "vae.json").read_text()))
    te_cfg = {k: v for k, v in json.loads((templates / "text_clip.json").read_text()).items()
              if k not in ("architectures", "model_type")}
    UNet2DConditionModel(**unet_cfg).half().save_pretrained(folder / "unet")
    AutoencoderKL(**vae_cfg).half().save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**te_cfg)).half().save_pretrained(folder / "text_encoder")
    for sub in ("tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for f in (FX / "tiny-sd1" / sub).iterdir():
            (folder / sub / f.name).write_bytes(f.read_bytes())
    (folder / "model_index.json").write_text((FX / "tiny-sd1" / "model_index.json").read_text())
    save_file(to_single_file(folder, "sd1"), out_dir / "sd15.safetensors")
    print(f"wrote {folder} and {out_dir / 'sd15.safetensors'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-sd15", metavar="DIR")
    ap.add_argument("--keep", action="store_true", help="keep the single files (not committed)")
    args = ap.parse_args()
    if args.full_sd15:
        full_sd15(args.full_sd15)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    layouts()
    for kind in ("sd1", "sd2", "sdxl"):
        folder = FX / f"tiny-{kind}"
        steps, extras = recipe(folder, kind)
        path = OUT / f"tiny-{kind}.safetensors"
        save_file(assemble(folder, steps, extras), path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        check_with_diffusers(path, folder, kind)
        extras_name = f"tiny-{kind}.extras.safetensors"
        save_file(extras, OUT / extras_name)
        doc = {
            "folder": f"tiny-{kind}",
            "extras": extras_name,
            "sha256": digest,
            "tensors": {name: [op, [list(s) for s in sources]] for name, (op, sources) in sorted(steps.items())},
        }
        (OUT / f"tiny-{kind}.recipe.json").write_text(json.dumps(doc, indent=0) + "\n")
        print(f"wrote the recipe of {path.name} ({path.stat().st_size} bytes, sha256 {digest[:12]})")
        if not args.keep:
            path.unlink()


if __name__ == "__main__":
    sys.exit(main())
