"""Textual-inversion fixtures and goldens: tests/fixtures/embeddings/.

Writes small random embeddings for the tiny models in the formats people share:
  sd1/shiny-cat.safetensors   AUTOMATIC1111's (`emb_params`, 2 vectors of 32)
  sd1/glowfox.safetensors     diffusers' learned_embeds (`{"<glowfox>": 32 values}`)
  sdxl/xl-style.safetensors   AUTOMATIC1111's SDXL (`clip_l` 2x32, `clip_g` 2x48)
  other/wrong-family.safetensors  (`emb_params` 1x48: fits no SD 1.x encoder, an error there)

and the goldens:
  diffusers.safetensors  diffusers' own textual inversion (`load_textual_inversion` with the
      file's stem as token): `prompt_embeds` of a few prompts on tiny-sd1 and tiny-sdxl (both
      encoders, and the pooled embedding), and the final latents of one tiny-sd1 pipeline run
      (Euler, 4 steps, guidance 7.5, seed 3, 32x32, output_type="latent").
  a1111.safetensors      AUTOMATIC1111's placement (vectors replace the token embeddings of
      their slots, weighted like the words around them, chunked as
      tools/make_prompt_fixtures.py reproduces `sd_hijack_clip.py`) on tiny-sd1 and tiny-sdxl.

Run from the repository root: "${PYTHON:-python3}" tools/make_embedding_fixtures.py
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_prompt_fixtures import Encoder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "tests" / "fixtures"
OUT = FX / "embeddings"


def write_embeddings():
    g = torch.Generator().manual_seed(11)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).contiguous()  # noqa: E731
    (OUT / "sd1").mkdir(parents=True, exist_ok=True)
    (OUT / "sdxl").mkdir(parents=True, exist_ok=True)
    (OUT / "other").mkdir(parents=True, exist_ok=True)
    emb = {
        "shiny-cat": r(2, 32),
        "glowfox": r(32),
        "xl_l": r(2, 32),
        "xl_g": r(2, 48),
    }
    save_file({"emb_params": emb["shiny-cat"]}, OUT / "sd1" / "shiny-cat.safetensors")
    save_file({"<glowfox>": emb["glowfox"]}, OUT / "sd1" / "glowfox.safetensors")
    save_file({"clip_l": emb["xl_l"], "clip_g": emb["xl_g"]}, OUT / "sdxl" / "xl-style.safetensors")
    save_file({"emb_params": r(1, 48)}, OUT / "other" / "wrong-family.safetensors")
    return emb


SD1_PROMPTS = ["a photo of shiny-cat", "glowfox and shiny-cat in a field", "a plain prompt"]
XL_PROMPTS = ["a painting, xl-style", "xl-style"]


@torch.no_grad()
def diffusers_goldens(emb):
    out = {}
    sd1 = StableDiffusionPipeline.from_pretrained(FX / "tiny-sd1", safety_checker=None, torch_dtype=torch.float32,
                                                  requires_safety_checker=False)
    sd1.load_textual_inversion(str(OUT / "sd1" / "shiny-cat.safetensors"), token="shiny-cat")
    sd1.load_textual_inversion(str(OUT / "sd1" / "glowfox.safetensors"), token="glowfox")
    for i, p in enumerate(SD1_PROMPTS):
        e, _ = sd1.encode_prompt(p, "cpu", 1, False)
        out[f"sd1/{i}"] = e.contiguous()
    sd1.scheduler = EulerDiscreteScheduler.from_config(sd1.scheduler.config)
    lat = sd1(SD1_PROMPTS[0], num_inference_steps=4, guidance_scale=7.5, height=32, width=32,
              generator=torch.Generator().manual_seed(3), output_type="latent").images
    out["sd1/latents"] = lat.contiguous()
    xl = StableDiffusionXLPipeline.from_pretrained(FX / "tiny-sdxl", torch_dtype=torch.float32)
    xl.load_textual_inversion(emb["xl_l"], token=["xl-style", "xl-style_1"],
                              text_encoder=xl.text_encoder, tokenizer=xl.tokenizer)
    xl.load_textual_inversion(emb["xl_g"], token=["xl-style", "xl-style_1"],
                              text_encoder=xl.text_encoder_2, tokenizer=xl.tokenizer_2)
    for i, p in enumerate(XL_PROMPTS):
        e, _, pooled, _ = xl.encode_prompt(p, device="cpu",
                                           num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
        out[f"sdxl/{i}"] = e.contiguous()
        out[f"sdxl/{i}/pooled"] = pooled.contiguous()
    save_file(out, OUT / "diffusers.safetensors")


class Fixed(Encoder):
    """An Encoder whose chunker places embeddings the way AUTOMATIC1111 does."""

    def __init__(self, *a, embeddings=None, **k):
        super().__init__(*a, **k)
        self.embeddings = embeddings  # name -> (n, hidden)
        self.lookup = {name: self.tok(name, add_special_tokens=False)["input_ids"]
                       for name in embeddings}

    def chunks(self, runs):
        # Names become one placeholder word that the base chunker tokenizes, then the slots are
        # widened here: simplest is to re-implement the loop with fixes.
        chunks, ids, weights, fixes = [], [], [], []
        last_comma = -1

        def close():
            nonlocal ids, weights, fixes, last_comma
            fill = CHUNK - len(ids)
            toks = [self.start] + ids + [self.end] * fill + [self.end]
            if self.pad != self.end:
                first_end = toks.index(self.end)
                toks = toks[: first_end + 1] + [self.pad] * (len(toks) - first_end - 1)
            chunks.append((toks, [1.0] + weights + [1.0] * fill + [1.0], fixes))
            ids, weights, fixes, last_comma = [], [], [], -1

        for text, weight in runs:
            if text == "BREAK" and weight == -1:
                close()
                continue
            tokens = self.tok(text, truncation=False, add_special_tokens=False)["input_ids"]
            pos = 0
            while pos < len(tokens):
                token = tokens[pos]
                if token == self.comma:
                    last_comma = len(ids)
                elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= 20:
                    mi, mw = ids[last_comma + 1:], weights[last_comma + 1:]
                    ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                    close()
                    ids, weights = mi, mw
                if len(ids) == CHUNK:
                    close()
                match = None
                for name, nid in sorted(self.lookup.items(), key=lambda kv: -len(kv[1])):
                    if tokens[pos:pos + len(nid)] == nid:
                        match = name
                        break
                if match is None:
                    ids.append(token)
                    weights.append(weight)
                    pos += 1
                    continue
                vec = self.embeddings[match]
                if len(ids) + vec.shape[0] > CHUNK:
                    close()
                fixes.append((len(ids) + 1, vec))
                ids += [0] * vec.shape[0]
                weights += [weight] * vec.shape[0]
                pos += len(self.lookup[match])
        if ids or not chunks:
            close()
        return chunks

    @torch.no_grad()
    def encode(self, texts, parse):
        chunked = [self.chunks(parse(t)) for t in texts]
        empty = self.chunks([["", 1.0]])[0]
        zs, pooled = [[] for _ in texts], [None for _ in texts]
        tm = getattr(self.model, "text_model", self.model)
        for k in range(max(len(c) for c in chunked)):
            batch = [c[k] if k < len(c) else empty for c in chunked]
            ids = torch.tensor([b[0] for b in batch])
            mult = torch.tensor([b[1] for b in batch], dtype=torch.float32)

            def hook(_module, _inputs, output, batch=batch):
                output = output.clone()
                for row, (_, _, fx) in enumerate(batch):
                    for at, vec in fx:
                        n = min(output.shape[1] - at, vec.shape[0])
                        output[row, at:at + n] = vec[:n]
                return output

            handle = tm.embeddings.token_embedding.register_forward_hook(hook)
            out = self.model(input_ids=ids, output_hidden_states=True)
            handle.remove()
            z = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
            original_mean = z.mean()
            z = z * mult.reshape(mult.shape + (1,)).expand(z.shape)
            z = z * (original_mean / z.mean())
            for i, c in enumerate(chunked):
                if k < len(c):
                    zs[i].append(z[i:i + 1])
                if k == 0 and hasattr(out, "text_embeds"):
                    pooled[i] = out.text_embeds[i:i + 1]
        return [torch.cat(z, 1) for z in zs], pooled


CHUNK = 75
A1111_SD1 = ["a photo of shiny-cat", "(shiny-cat:1.4), [glowfox]", "glowfox " + "word " * 74]
A1111_XL = ["(a painting:1.2), xl-style"]


def a1111_goldens(emb):
    from make_prompt_fixtures import a1111_parser  # noqa: E402
    pp = a1111_parser()
    out = {}
    sd1 = Fixed(FX / "tiny-sd1/text_encoder", FX / "tiny-sd1/tokenizer", "last",
                embeddings={"shiny-cat": emb["shiny-cat"], "glowfox": emb["glowfox"][None]})
    for i, p in enumerate(A1111_SD1):
        z, _ = sd1.encode([p], pp.parse_prompt_attention)
        out[f"sd1/{i}"] = z[0].contiguous()
    l = Fixed(FX / "tiny-sdxl/text_encoder", FX / "tiny-sdxl/tokenizer", "penultimate",
              embeddings={"xl-style": emb["xl_l"]})
    gg = Fixed(FX / "tiny-sdxl/text_encoder_2", FX / "tiny-sdxl/tokenizer_2", "penultimate",
               embeddings={"xl-style": emb["xl_g"]}, with_projection=True)
    for i, p in enumerate(A1111_XL):
        zl, _ = l.encode([p], pp.parse_prompt_attention)
        zg, pooled = gg.encode([p], pp.parse_prompt_attention)
        out[f"sdxl/{i}"] = torch.cat([zl[0], zg[0]], 2).contiguous()
        out[f"sdxl/{i}/pooled"] = pooled[0].contiguous()
    save_file(out, OUT / "a1111.safetensors")


def main():
    emb = write_embeddings()
    diffusers_goldens(emb)
    a1111_goldens(emb)
    print("wrote", sorted(p.name for p in OUT.rglob("*.safetensors")))


if __name__ == "__main__":
    main()
