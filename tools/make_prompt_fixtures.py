"""Golden files for AUTOMATIC1111's prompt syntax: tests/fixtures/prompts/.

parse.json: for a corpus of prompts (written cases plus seeded random strings over the syntax's
characters), the schedule that AUTOMATIC1111's own `get_learned_conditioning_prompt_schedules`
makes at 10 and 20 steps, and `parse_prompt_attention` of every scheduled text. Both come from
AUTOMATIC1111's `modules/prompt_parser.py`, imported from a checkout named by $A1111_DIR (its
parser needs `lark`, pinned as AUTOMATIC1111 pins it: `pip install lark==1.1.2`).

cond.safetensors + cond.json: the conditioning of some of those prompts on the tiny text
encoders (tests/fixtures/tiny-sd1, tiny-sd2, tiny-sdxl), computed the way AUTOMATIC1111's
`modules/sd_hijack_clip.py` computes it, reproduced below over transformers' CLIPTextModel:
each weighted run tokenized alone, chunks of 75 tokens with start and end tokens (BREAK closes
a chunk, the words after a comma at most 20 tokens back move to the next chunk), end tokens as
filler, OpenCLIP's pad id after the first end token, chunk k of every scheduled text of a
prompt encoded as one batch, hidden states times their weights and scaled back to the batch's
original mean, chunks concatenated; clip skip n reads hidden_states[-n] through the final layer
norm (SD 1.x); SDXL's pooled embedding from the first chunk.

Run from the repository root:
    A1111_DIR=path/to/stable-diffusion-webui "${PYTHON:-python3}" tools/make_prompt_fixtures.py
"""
import json
import os
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "prompts"
CHUNK = 75
BACKTRACK = 20

WRITTEN = [
    "a photo of a cat",
    "",
    " ",
    "an (important) word",
    "a ((very)) important [word]",
    "(masterpiece:1.2), best quality, (cat:0.8)",
    "(masterpiece: 1.2 ), best quality",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "(unbalanced",
    "unbalanced)",
    "[unbalanced",
    "a ]closing first[ b",
    "\\(literal\\) \\[brackets\\] and a \\\\ backslash",
    "escaped \\(not (emphasis:1.5)\\)",
    "(unnecessary)(parens)",
    "((a:1.5) b:0.5)",
    "(a:1.2.3)",
    "(a:-1)",
    "(a:+2)",
    "(a:.5)",
    "(a:)",
    "a : b : c",
    "BREAK",
    "a BREAK b",
    "a BREAK BREAK b",
    "aBREAK b BREAKfast",
    "(red BREAK blue:1.3)",
    "a\nBREAK\tb",
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]",
    "a [b:3]",
    "a [b: 3]",
    "a [b: 3 ]",
    "a [[[b]]:2]",
    "[(a:2):3]",
    "a [b : c : 1] d",
    "a[b:[c:d:2]:1]e",
    "a [b:.5] c",
    "a [b:0.5] c",
    "a [b:1.0] c",
    "a [b:1.5] c",
    "a [b:1e1] c",
    "a [b:-1] c",
    "a [b:0] c",
    "a [b:100] c",
    "[a:b:7]",
    "[:b:2]",
    "[a::2]",
    "[a:b]",
    "[a|b]",
    "[a|(b:1.1)]",
    "[fe|]male",
    "[fe|||]male",
    "[cat|dog|fox] in a field",
    "[[a|b]|c]",
    "[a|[b:c:3]]",
    "a|b",
    "((a][:b:c [d:3]",
    "a [{b|d{:.5] c",
    "[ [a:2] ]",
    "(a [b:c:2] d:1.4)",
    "[(dog:1.3)|cat:5]",
    "un chat noir, très élégant, (ciel étoilé:1.2)",
    "猫と犬 (桜:1.3) BREAK 富士山",
    "emoji 🐱 (🌸:1.2) [🐶|🦊]",
    "tabs\tand\nnewlines (here:1.1)",
    ", , , (,:1.5) , ,",
    "masterpiece, best quality, " + ", ".join(f"detail {i}" for i in range(40)),
    " ".join(["word"] * 80),
    ", ".join(["tree"] * 90),
    "(" + " ".join(["big"] * 100) + ":1.3), small, " + ", ".join(["tiny"] * 70),
    "a, " + " ".join(["x"] * 73) + " y z, w",
    "prefix " + " ".join(["long"] * 70) + ", after a comma " + " ".join(["more"] * 10),
    "first part BREAK " + ", ".join(["second"] * 80) + " BREAK third",
    "[" + ", ".join(["one"] * 60) + ":" + ", ".join(["two"] * 90) + ":4]",
    "a [b:c:0.3] [d|e] (f:1.2) [g] BREAK h",
]

FUZZ_ALPHABET = list("ab c,()[]:|\\") + ["0.5", "1", "3", "1.2", " BREAK ", "é", "猫", "\n"]


def fuzz(n, seed=1234):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(1, 24)
        out.append("".join(rng.choice(FUZZ_ALPHABET) for _ in range(length)))
    return out


def a1111_parser():
    base = os.environ.get("A1111_DIR")
    if not base:
        sys.exit("set A1111_DIR to a checkout of AUTOMATIC1111/stable-diffusion-webui")
    sys.path.insert(0, str(Path(base) / "modules"))
    import prompt_parser  # noqa: E402  (AUTOMATIC1111's own module)

    return prompt_parser


def parse_cases(pp, prompts):
    cases = []
    for prompt in prompts:
        for steps in (10, 20):
            try:
                sched = pp.get_learned_conditioning_prompt_schedules([prompt], steps)[0]
            except Exception as e:  # AUTOMATIC1111 itself raises on these
                cases.append({"prompt": prompt, "steps": steps, "error": type(e).__name__})
                continue
            entries = []
            for until, text in sched:
                try:
                    attention = pp.parse_prompt_attention(text)
                except ValueError:
                    attention = None
                entries.append({"until": until, "text": text, "attention": attention})
            cases.append({"prompt": prompt, "steps": steps, "schedule": entries})
    return cases


class Encoder:
    """One text encoder with AUTOMATIC1111's chunking and emphasis."""

    def __init__(self, folder, tokenizer_folder, layer, with_projection=False):
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        self.model = cls.from_pretrained(folder, torch_dtype=torch.float32).eval()
        self.tok = CLIPTokenizer.from_pretrained(tokenizer_folder)
        self.layer = layer  # "last", "penultimate" (no final norm), or ("skip", n)
        self.start = self.tok.bos_token_id
        self.end = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id
        self.comma = self.tok.get_vocab().get(",</w>")

    def chunks(self, runs):
        chunks, ids, weights = [], [], []
        last_comma = -1

        def close():
            nonlocal ids, weights, last_comma
            fill = CHUNK - len(ids)
            toks = [self.start] + ids + [self.end] * fill + [self.end]
            if self.pad != self.end:
                first_end = toks.index(self.end)
                toks = toks[: first_end + 1] + [self.pad] * (len(toks) - first_end - 1)
            chunks.append((toks, [1.0] + weights + [1.0] * fill + [1.0]))
            ids, weights, last_comma = [], [], -1

        for text, weight in runs:
            if text == "BREAK" and weight == -1:
                close()
                continue
            for token in self.tok(text, truncation=False, add_special_tokens=False)["input_ids"]:
                if token == self.comma:
                    last_comma = len(ids)
                elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= BACKTRACK:
                    moved_ids, moved_w = ids[last_comma + 1:], weights[last_comma + 1:]
                    ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                    close()
                    ids, weights = moved_ids, moved_w
                if len(ids) == CHUNK:
                    close()
                ids.append(token)
                weights.append(weight)
        if ids or not chunks:
            close()
        return chunks

    @torch.no_grad()
    def encode(self, texts, parse):
        chunked = [self.chunks(parse(t)) for t in texts]
        empty = self.chunks([["", 1.0]])[0]
        count = max(len(c) for c in chunked)
        zs, pooled = [[] for _ in texts], [None for _ in texts]
        for k in range(count):
            batch = [c[k] if k < len(c) else empty for c in chunked]
            ids = torch.tensor([b[0] for b in batch])
            mult = torch.tensor([b[1] for b in batch], dtype=torch.float32)
            out = self.model(input_ids=ids, output_hidden_states=True)
            if self.layer == "last":
                z = out.last_hidden_state
            elif self.layer == "penultimate":
                z = out.hidden_states[-2]
            else:
                z = out.hidden_states[-self.layer[1]]
                # transformers 5 flattens text_model into the model itself.
                tm = getattr(self.model, "text_model", self.model)
                z = tm.final_layer_norm(z)
            original_mean = z.mean()
            z = z * mult.reshape(mult.shape + (1,)).expand(z.shape)
            z = z * (original_mean / z.mean())
            for i, c in enumerate(chunked):
                if k < len(c):
                    zs[i].append(z[i : i + 1])
                if k == 0 and hasattr(out, "text_embeds"):
                    pooled[i] = out.text_embeds[i : i + 1]
        return [torch.cat(z, 1) for z in zs], pooled


COND_PROMPTS = [
    "a photo of a cat",
    "(masterpiece:1.2), best quality, (cat:0.8)",
    "a ((very)) important [word]",
    "a BREAK b",
    "un chat noir, très élégant, (ciel étoilé:1.2)",
    ", ".join(["tree"] * 90),
    "(" + " ".join(["big"] * 100) + ":1.3), small, " + ", ".join(["tiny"] * 70),
    "prefix " + " ".join(["long"] * 70) + ", after a comma " + " ".join(["more"] * 10),
    "a [red:blue:0.5] house",
    "[cat|dog] in a field",
    "a [b:c:0.3] [d|e] (f:1.2) [g] BREAK h",
    "[" + ", ".join(["one"] * 60) + ":" + ", ".join(["two"] * 90) + ":4]",
]


def cond_cases(pp, steps=6):
    fx = ROOT / "tests" / "fixtures"
    models = {
        "sd1": [Encoder(fx / "tiny-sd1/text_encoder", fx / "tiny-sd1/tokenizer", "last")],
        "sd1-skip2": [Encoder(fx / "tiny-sd1/text_encoder", fx / "tiny-sd1/tokenizer", ("skip", 2))],
        "sd2": [Encoder(fx / "tiny-sd2/text_encoder", fx / "tiny-sd2/tokenizer", "last")],
        "sdxl": [
            Encoder(fx / "tiny-sdxl/text_encoder", fx / "tiny-sdxl/tokenizer", "penultimate"),
            Encoder(fx / "tiny-sdxl/text_encoder_2", fx / "tiny-sdxl/tokenizer_2", "penultimate",
                    with_projection=True),
        ],
    }
    tensors, index = {}, []
    for name, encoders in models.items():
        for i, prompt in enumerate(COND_PROMPTS):
            sched = pp.get_learned_conditioning_prompt_schedules([prompt], steps)[0]
            texts = [t for _, t in sched]
            parts, pooled = [], None
            for enc in encoders:
                z, p = enc.encode(texts, pp.parse_prompt_attention)
                parts.append(z)
                if p[0] is not None:
                    pooled = p
            for j, (until, _) in enumerate(sched):
                key = f"{name}/{i}/{j}"
                tensors[key] = torch.cat([z[j] for z in parts], 2).contiguous()
                if pooled is not None:
                    tensors[key + "/pooled"] = pooled[j].contiguous()
            index.append({"model": name, "prompt": prompt, "steps": steps,
                          "until": [u for u, _ in sched], "case": i})
    return tensors, index


def main():
    pp = a1111_parser()
    OUT.mkdir(parents=True, exist_ok=True)
    prompts = WRITTEN + fuzz(240)
    cases = parse_cases(pp, prompts)
    (OUT / "parse.json").write_text(json.dumps(cases, ensure_ascii=False, indent=0) + "\n")
    tensors, index = cond_cases(pp)
    save_file(tensors, OUT / "cond.safetensors")
    (OUT / "cond.json").write_text(json.dumps(index, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(cases)} parse cases ({len(WRITTEN)} written prompts, 240 random), "
          f"{len(index)} conditioning cases, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
