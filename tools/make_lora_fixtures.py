"""LoRA fixtures and goldens: tests/fixtures/lora/.

Writes small random LoRA files for the tiny models in the formats people share:
  sd1/kohya-style.safetensors  kohya / AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`,
      `lora_down`/`lora_up`/`alpha`): attention and feed-forward linears, a 1x1 proj_in, a
      LoCon 3x3 resnet convolution (3x3 down, 1x1 up), one layer without alpha, two
      text-encoder layers.
  sd1/peft-style.safetensors   diffusers / PEFT as `save_lora_weights` writes it
      (`unet.*`/`text_encoder.*` with `lora_A`/`lora_B`, lora_alpha 8 at rank 4 in the
      `lora_adapter_metadata` header entry, a 3x3 convolution among the targets).
  sdxl/xl-kohya.safetensors    kohya SDXL as sd-scripts writes it: UNet layers under the
      original SGM names (`lora_unet_input_blocks_4_1_...`, `middle_block`, `output_blocks`,
      a LoCon `in_layers_2`), `lora_te1_*` and `lora_te2_*`.

and the goldens, diffusers.safetensors: final latents of tiny-sd1 / tiny-sdxl diffusers
pipeline runs (Euler, 4 steps, guidance 7.5, seed 3, 32x32, output_type="latent"):
  sd1/none, sdxl/none       without LoRA;
  sd1/peft/1.0              the PEFT file through diffusers' own `load_lora_weights` +
                            `fuse_lora(lora_scale=1.0)`;
  sd1/kohya/1.0, sd1/kohya/0.6, sdxl/kohya/0.8
                            the kohya files merged with AUTOMATIC1111's formula into the
                            modules diffusers' `load_lora_weights` maps them to (see
                            `merge_kohya`: diffusers 0.42.1 mis-scales and drops some kohya
                            layers; the script prints which);
  sd1/both                  kohya at 0.5 (as above), then the PEFT file fused at 0.8.

Run from the repository root: "${PYTHON:-python3}" tools/make_lora_fixtures.py
"""
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "tests" / "fixtures"
OUT = FX / "lora"
PROMPT = "a photo of a cat"

g = torch.Generator().manual_seed(21)


def r(*shape, std=0.3):
    return (torch.randn(*shape, generator=g) * std).contiguous()


def kohya_layer(sd, name, out_dim, in_dim, rank, alpha=None, kernel=None):
    """A kohya layer: down (rank, in[, k, k]), up (out, rank[, 1, 1]), optional alpha."""
    if kernel is None:
        sd[f"{name}.lora_down.weight"] = r(rank, in_dim)
        sd[f"{name}.lora_up.weight"] = r(out_dim, rank)
    else:
        sd[f"{name}.lora_down.weight"] = r(rank, in_dim, kernel, kernel)
        sd[f"{name}.lora_up.weight"] = r(out_dim, rank, 1, 1)
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))


def write_sd1_kohya():
    sd = {}
    u = "lora_unet_"
    kohya_layer(sd, u + "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32, 4, 2)
    kohya_layer(sd, u + "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 64, 32, 4, 8)
    kohya_layer(sd, u + "down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0", 64, 64, 4, 4)
    kohya_layer(sd, u + "mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", 512, 64, 2)
    kohya_layer(sd, u + "up_blocks_1_attentions_0_proj_in", 64, 64, 4, 4, kernel=1)
    kohya_layer(sd, u + "down_blocks_0_resnets_0_conv1", 32, 32, 4, 1, kernel=3)
    kohya_layer(sd, "lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, 4, 4)
    kohya_layer(sd, "lora_te_text_model_encoder_layers_1_mlp_fc1", 64, 32, 2, 1)
    save_file(sd, OUT / "sd1" / "kohya-style.safetensors")


def write_sdxl_kohya():
    sd = {}
    u = "lora_unet_"
    # down_blocks.1.attentions.0 = input_blocks.4.1; mid_block.attentions.0 = middle_block.1;
    # up_blocks.0.attentions.0 = output_blocks.0.1; down_blocks.0.resnets.0.conv1 =
    # input_blocks.1.0.in_layers.2.
    kohya_layer(sd, u + "input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64, 4, 2)
    kohya_layer(sd, u + "middle_block_1_proj_in", 64, 64, 4, 4)
    kohya_layer(sd, u + "output_blocks_0_1_transformer_blocks_0_attn2_to_v", 64, 80, 4, 8)
    kohya_layer(sd, u + "input_blocks_1_0_in_layers_2", 32, 32, 2, 1, kernel=3)
    kohya_layer(sd, "lora_te1_text_model_encoder_layers_0_self_attn_v_proj", 32, 32, 4, 4)
    # diffusers cannot load a text encoder's kohya layers when all are self-attention ones.
    kohya_layer(sd, "lora_te1_text_model_encoder_layers_1_mlp_fc2", 32, 64, 2, 4)
    kohya_layer(sd, "lora_te2_text_model_encoder_layers_1_mlp_fc2", 48, 96, 4, 2)
    kohya_layer(sd, "lora_te2_text_model_encoder_layers_1_self_attn_k_proj", 48, 48, 2, 2)
    save_file(sd, OUT / "sdxl" / "xl-kohya.safetensors")


def sd1():
    p = StableDiffusionPipeline.from_pretrained(FX / "tiny-sd1", safety_checker=None, torch_dtype=torch.float32,
                                                requires_safety_checker=False)
    p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    return p


def sdxl():
    p = StableDiffusionXLPipeline.from_pretrained(FX / "tiny-sdxl", torch_dtype=torch.float32)
    p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    return p


# A few modules of each kind (PEFT reads a string as a regex the whole module name matches).
PEFT_UNET_TARGETS = (r"(down_blocks\.1\.attentions\.0\..*to_k|mid_block\..*to_out\.0"
                     r"|up_blocks\.1\.attentions\.1\.proj_out|down_blocks\.1\.resnets\.1\.conv2)")


def write_sd1_peft():
    p = sd1()
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=PEFT_UNET_TARGETS)
    te_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["k_proj", "fc2"])
    p.unet.add_adapter(unet_cfg)
    p.text_encoder.add_adapter(te_cfg)
    with torch.no_grad():
        for model in (p.unet, p.text_encoder):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(r(*param.shape, std=0.2))
    with tempfile.TemporaryDirectory() as d:
        StableDiffusionPipeline.save_lora_weights(
            d,
            unet_lora_layers=get_peft_model_state_dict(p.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(p.text_encoder),
            # The local path PEFT records is of no use in a shared file.
            unet_lora_adapter_metadata={**unet_cfg.to_dict(), "base_model_name_or_path": None},
            text_encoder_lora_adapter_metadata={**te_cfg.to_dict(), "base_model_name_or_path": None},
            weight_name="peft-style.safetensors",
        )
        data = (Path(d) / "peft-style.safetensors").read_bytes()
    (OUT / "sd1" / "peft-style.safetensors").write_bytes(data)


@torch.no_grad()
def latents(p):
    return p(PROMPT, num_inference_steps=4, guidance_scale=7.5, height=32, width=32,
             generator=torch.Generator().manual_seed(3), output_type="latent").images.contiguous()


def kohya_layers(path):
    """{layer name: (down, up, alpha or None)} of a kohya file."""
    sd = load_file(str(path))
    layers = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            alpha = sd.get(name + ".alpha")
            layers[name] = (sd[k], sd[name + ".lora_up.weight"], None if alpha is None else alpha.item())
    return layers


COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
              "lora_te2_": "text_encoder_2"}


@torch.no_grad()
def merge_kohya(p, path, weight):
    """AUTOMATIC1111's merge of a kohya file: W += weight * alpha / rank * up @ down (alpha
    defaults to the rank), into the modules diffusers' own loader maps the layers to.

    diffusers 0.42.1 maps the names (SGM ones included) but mis-scales kohya files: the alphas
    of attention layers (`to_q_lora` names) and of text-encoder layers (transformers 5 has no
    `text_model.` in module names) match nothing, so those layers take the file's first alpha,
    as do layers without alpha; and it drops text-encoder self-attention layers. So the
    module each layer lands in comes from diffusers (found by its lora_A being the layer's
    down weight), the arithmetic from AUTOMATIC1111's formula; a layer diffusers drops is found
    by its kohya name among the component's modules.
    """
    layers = kohya_layers(path)
    p.load_lora_weights(str(path), adapter_name="probe")
    where = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(p, comp, None)
        for _, m in (model.named_modules() if model is not None else []):
            if hasattr(m, "lora_A") and "probe" in m.lora_A:
                a = m.lora_A["probe"].weight
                for name, (down, up, alpha) in layers.items():
                    if down.shape == a.shape and torch.equal(down.float(), a.float()):
                        rank = down.shape[0]
                        want = (alpha if alpha is not None else rank) / rank
                        got = m.scaling["probe"]
                        if abs(got - want) > 1e-6:
                            print(f"  diffusers scales {name} by {got}, AUTOMATIC1111 by {want}")
                        where[name] = m.base_layer
    p.unload_lora_weights()
    for name, (down, up, alpha) in layers.items():
        module = where.get(name)
        if module is None:
            prefix = next(pre for pre in COMPONENTS if name.startswith(pre))
            model = getattr(p, COMPONENTS[prefix])
            table = {}
            for n, m in model.named_modules():
                table[n.replace(".", "_")] = m
                table[("text_model." + n).replace(".", "_")] = m
            module = table[name[len(prefix):]]
            print(f"  diffusers drops {name}; merged into it here")
        rank = down.shape[0]
        scale = weight * (alpha if alpha is not None else rank) / rank
        w = module.weight
        delta = up.reshape(up.shape[0], rank).float() @ down.reshape(rank, -1).float()
        w += (delta * scale).reshape(w.shape)


def with_peft(p, path, weight):
    """diffusers' own load_lora_weights + fuse_lora(lora_scale=weight)."""
    p.load_lora_weights(str(path), adapter_name="peft")
    p.fuse_lora(lora_scale=weight, adapter_names=["peft"])
    p.unload_lora_weights()
    return p


def main():
    for sub in ("sd1", "sdxl"):
        (OUT / sub).mkdir(parents=True, exist_ok=True)
    write_sd1_kohya()
    write_sdxl_kohya()
    write_sd1_peft()
    kohya = OUT / "sd1" / "kohya-style.safetensors"
    peft = OUT / "sd1" / "peft-style.safetensors"
    xl = OUT / "sdxl" / "xl-kohya.safetensors"
    out = {"sd1/none": latents(sd1()), "sdxl/none": latents(sdxl())}
    for w in (1.0, 0.6):
        p = sd1()
        merge_kohya(p, kohya, w)
        out[f"sd1/kohya/{w}"] = latents(p)
    out["sd1/peft/1.0"] = latents(with_peft(sd1(), peft, 1.0))
    p = sd1()
    merge_kohya(p, kohya, 0.5)
    out["sd1/both"] = latents(with_peft(p, peft, 0.8))
    p = sdxl()
    merge_kohya(p, xl, 0.8)
    out["sdxl/kohya/0.8"] = latents(p)
    for k, v in out.items():
        if k.endswith("/none"):
            continue
        base = out[k.split("/")[0] + "/none"]
        print(f"{k}: max |latents - no LoRA| = {(v - base).abs().max().item():.4f}")
    save_file(out, OUT / "diffusers.safetensors")
    print("wrote", sorted(str(p.relative_to(OUT)) for p in OUT.rglob("*.safetensors")))


if __name__ == "__main__":
    main()
