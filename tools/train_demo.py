#!/usr/bin/env python3
"""Trains latent's bundled demo model (weights/demo) from scratch on procedurally drawn shapes.

The data: 64x64 pictures of one flat-coloured shape (circle, square, triangle, star) in one of
six colours on a background of another, at one of five positions and three sizes (placed on
the VAE's 4-pixel latent grid), captioned in four phrasings ("a small red circle on the left,
on a blue background", "a blue background with a red circle", ...; size and position words are
sometimes left out). A fixed set of (shape, colour, background) combinations is never drawn in
training; the evaluation reports them apart.

The model is Stable Diffusion's architecture family at toy size, in the exact diffusers layout:
  vae/           AutoencoderKL, 3 blocks (4x spatial compression), 4 latent channels
  text_encoder/  CLIPTextModel (hidden 64, 3 layers) over the real CLIP BPE tokenizer
  tokenizer/     vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json
  unet/          UNet2DConditionModel with cross-attention (16x16 latents), v-prediction
  scheduler/     DPM++ 2M (DPMSolverMultistepScheduler), zero terminal SNR, trailing steps
  model_index.json (StableDiffusionPipeline, no safety checker)

Stages: (1) draw the dataset, (2) train the VAE, (3) encode the dataset to latents, (4) train
the UNet and the text encoder together (DDPM noising on SD's betas rescaled to zero terminal
SNR, v-prediction loss, 10% empty captions for classifier-free guidance, EMA weights), (5) save
in float16, (6) load the folder back with diffusers' StableDiffusionPipeline and score
generated images with the same checker as tests/demo.rs (colour of the shape, colour of the
background, shape class; position and size where the prompt names them).

Every stage has its own seeded generator; with the same thread count the run is repeatable.
Run offline, with a Python (PYTHON, default python3) that has torch, diffusers and transformers (the shipped model: 62.4 minutes of training on an idle
2-core machine, 3.0 for the VAE stage and 59.2 for the UNet, then half a minute of scoring):
  HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/train_demo.py
  HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/train_demo.py --eval-only   # score weights/demo
"""

import argparse
import copy
import gzip
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SIZE = 64  # image side in pixels
DATA_VERSION = 3  # bump when the drawing changes, to invalidate --work caches
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LEN = 77

# --------------------------------------------------------------------------------------------
# The world: shapes, colours, positions, sizes. tests/demo.rs holds the same tables.

SHAPES = ["circle", "square", "triangle", "star"]
COLORS = {
    "red": (220, 40, 40),
    "yellow": (240, 210, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
POSITIONS = {
    "left": " on the left",
    "right": " on the right",
    "top": " at the top",
    "bottom": " at the bottom",
    "center": " in the center",
}
# Half the shape's extent in pixels, per size class: sides of 5, 7 and 9 latent cells.
RADIUS = {"small": 10, "medium": 14, "large": 18}
SIZE_WORDS = {"small": "small ", "medium": "", "large": "large "}
STAR_INNER = 0.4  # inner radius of the 5-point star, as a fraction of the outer one

# (shape, colour, background) combinations never drawn in training: every shape, colour and
# background still occurs in other combinations.
HELD_OUT = [
    ("circle", "green", "white"),
    ("circle", "yellow", "black"),
    ("square", "red", "white"),
    ("square", "blue", "yellow"),
    ("triangle", "blue", "green"),
    ("triangle", "white", "red"),
    ("star", "yellow", "blue"),
    ("star", "black", "green"),
]

# Prompts scored by tests/demo.rs and by this script's evaluation: (prompt, shape, colour,
# background, position or None, size or None). The first list uses trained combinations.
EVAL_TRAINED = [
    ("a red circle on a blue background", "circle", "red", "blue", None, None),
    ("a yellow square on a black background", "square", "yellow", "black", None, None),
    ("a green triangle on a white background", "triangle", "green", "white", None, None),
    ("a white star on a blue background", "star", "white", "blue", None, None),
    ("a blue circle on a yellow background", "circle", "blue", "yellow", None, None),
    ("a black square on a green background", "square", "black", "green", None, None),
    ("a red triangle on a black background", "triangle", "red", "black", None, None),
    ("a yellow star on a red background", "star", "yellow", "red", None, None),
    ("a black circle on a white background", "circle", "black", "white", None, None),
    ("a green square on a red background", "square", "green", "red", None, None),
    ("a blue star on a white background", "star", "blue", "white", None, None),
    ("a white triangle on a black background", "triangle", "white", "black", None, None),
    ("a small red circle on the left, on a blue background", "circle", "red", "blue", "left",
     "small"),
    ("a large white square on a green background", "square", "white", "green", None, "large"),
    ("a blue triangle at the top, on a yellow background", "triangle", "blue", "yellow", "top",
     None),
    ("a green star on the right, on a black background", "star", "green", "black", "right", None),
    ("yellow circle at the bottom, white background", "circle", "yellow", "white", "bottom", None),
    ("a red background with a white square", "square", "white", "red", None, None),
    ("a black background with a large yellow triangle", "triangle", "yellow", "black", None,
     "large"),
    ("a blue background with a green circle", "circle", "green", "blue", None, None),
]
EVAL_HELD_OUT = [
    ("a green circle on a white background", "circle", "green", "white", None, None),
    ("a yellow circle on a black background", "circle", "yellow", "black", None, None),
    ("a red square on a white background", "square", "red", "white", None, None),
    ("a blue square on a yellow background", "square", "blue", "yellow", None, None),
    ("a blue triangle on a green background", "triangle", "blue", "green", None, None),
    ("a white triangle on a red background", "triangle", "white", "red", None, None),
    ("a yellow star on a blue background", "star", "yellow", "blue", None, None),
    ("a black star on a green background", "star", "black", "green", None, None),
]
EVAL_SEED = 1000  # prompt i of the list is drawn with seed EVAL_SEED + i


def trained_combos():
    held = set(HELD_OUT)
    return [
        (s, c, b)
        for s in SHAPES
        for c in COLORS
        for b in COLORS
        if c != b and (s, c, b) not in held
    ]


def sample_spec(rng, combos=None):
    """A random picture description: shape, colours, position, size."""
    combos = combos or trained_combos()
    shape, color, bg = combos[rng.integers(len(combos))]
    return {
        "shape": shape,
        "color": color,
        "background": bg,
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
        "size": list(RADIUS)[rng.integers(len(RADIUS))],
    }


def caption(spec, rng):
    """One of a few phrasings; position and size words are each left out now and then."""
    size = SIZE_WORDS[spec["size"]] if rng.random() < 0.8 else ""
    pos = POSITIONS[spec["position"]] if rng.random() < 0.8 else ""
    c, s, b = spec["color"], spec["shape"], spec["background"]
    templates = [
        f"a {size}{c} {s}{pos}, on a {b} background",
        f"a {size}{c} {s}{pos} on a {b} background",
        f"{size}{c} {s}{pos}, {b} background",
        f"a {b} background with a {size}{c} {s}{pos}",
    ]
    return templates[rng.integers(len(templates))]


def shape_center(spec, r):
    """Centre of the shape's bounding box for its position class (before jitter)."""
    mid = SIZE / 2
    off = max(10.0, mid - r - 3)
    return {
        "left": (mid - off, mid),
        "right": (mid + off, mid),
        "top": (mid, mid - off),
        "bottom": (mid, mid + off),
        "center": (mid, mid),
    }[spec["position"]]


def jitter_color(rgb, rng, amount=12):
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def snap_to_latent_grid(v, r):
    """The nearest centre whose bounding box [v - r, v + r) starts on a latent cell boundary
    (a multiple of the VAE's 4-pixel downsampling; r is 2 mod 4, so v is 2 mod 4), keeping the
    shape at least 2 pixels inside the picture."""
    lo, hi = r + 2, SIZE - r - 2
    g = 4 * round((min(max(v, lo), hi) - 2) / 4) + 2
    return g + 4 if g < lo else g - 4 if g > hi else g


def render(spec, rng, scale=4):
    """Draws the picture at `scale`x and box-filters it down to SIZE x SIZE (anti-aliased). The
    size is exact and the jittered centre snaps to the latent grid, so the bounding box (a
    square's edges) falls on latent cell boundaries: a model trained on shapes at any sub-cell
    offset drew squares with rounded corners (weights/README.md)."""
    r = RADIUS[spec["size"]]
    cx, cy = shape_center(spec, r)
    cx = snap_to_latent_grid(cx + rng.uniform(-2.0, 2.0), r)
    cy = snap_to_latent_grid(cy + rng.uniform(-2.0, 2.0), r)
    big = SIZE * scale
    img = Image.new("RGB", (big, big), jitter_color(COLORS[spec["background"]], rng))
    d = ImageDraw.Draw(img)
    fill = jitter_color(COLORS[spec["color"]], rng)
    cx, cy, r = cx * scale, cy * scale, r * scale
    # PIL's boxes include their far edge: [x0, x1 - 1] covers x1 - x0 big pixels.
    shape = spec["shape"]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "star":
        # A point-up pentagram-like star whose bounding box is centred on (cx, cy).
        top, bottom = -1.0, math.cos(math.pi / 5)
        oy = cy - r * (top + bottom) / 2
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * STAR_INNER
            pts.append((cx + rr * math.cos(a), oy + rr * math.sin(a)))
        d.polygon(pts, fill=fill)
    img = img.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# The checker: what a picture shows, by measurement. tests/demo.rs implements the same rules.

# A pixel belongs to the shape when it is this far (RGB Euclidean) from the background colour.
MASK_DISTANCE = 60.0


def nearest_color(rgb):
    names = list(COLORS)
    pal = np.array([COLORS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((pal - np.asarray(rgb, dtype=np.float64)) ** 2).sum(-1)))]


def largest_component(mask):
    """The largest 8-connected region of a boolean mask (the first in row-major order on a
    tie): the shape, without the specks a decoder leaves elsewhere (a stray pixel in a corner
    would otherwise stretch the bounding box over the whole picture)."""
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or label[y0, x0]:
                continue
            current += 1
            label[y0, x0] = current
            stack, size = [(y0, x0)], 0
            while stack:
                y, x = stack.pop()
                size += 1
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v, u = y + dy, x + dx
                        if 0 <= v < h and 0 <= u < w and mask[v, u] and not label[v, u]:
                            label[v, u] = current
                            stack.append((v, u))
            if size > best_size:
                best, best_size = current, size
    return label == best if best else mask


def measure(img):
    """Background colour (median of the 1-pixel border), the shape mask (the largest region of
    pixels far from it), the shape's colour (mean of the mask), class features and bounding
    box."""
    img = np.asarray(img, dtype=np.float64)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    mask = largest_component(np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > MASK_DISTANCE)
    out = {"background": nearest_color(bg_rgb), "area": int(mask.sum())}
    if out["area"] < 12:
        return out
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    out["extent"] = out["area"] / float(bw * bh)
    # Share of the mask in the upper half of its bounding box: 1/4 for a point-up triangle.
    out["top"] = float((ys < y0 + bh / 2).sum()) / out["area"]
    # Position from the bounding box, not the centroid (a triangle's centroid sits low).
    out["cx"] = (x0 + x1 + 1) / 2.0
    out["cy"] = (y0 + y1 + 1) / 2.0
    out["color"] = nearest_color(img[mask].mean(0))
    out["square_fit"], out["circle_fit"] = template_fits(mask)
    out["shape"] = classify_shape(out["extent"], out["top"], out["square_fit"], out["circle_fit"])
    out["radius"] = max(bw, bh) / 2.0
    return out


def template_fits(mask):
    """Intersection over union of the mask with an axis-aligned square and with a circle of the
    same area, both centred on its centroid (pixel centres at +0.5)."""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    half = math.sqrt(area) / 2
    square = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    circle = (xx - cx) ** 2 + (yy - cy) ** 2 <= area / math.pi
    fits = []
    for t in (square, circle):
        both = int((mask & t).sum())
        fits.append(both / (area + int(t.sum()) - both))
    return fits[0], fits[1]


def classify_shape(extent, top, square_fit, circle_fit):
    """A point-up triangle has 1/4 of its area in the upper half of its box, the thin-armed
    star fills ~0.4 of its box; a square or circle overlaps a template of its own kind (same
    area and centroid) by ~1 and one of the other kind by ~0.83. Unlike the box, the templates
    do not stretch with a bump on an edge."""
    if top < 0.38:
        return "triangle"
    if extent <= 0.6:
        return "star"
    return "square" if square_fit > circle_fit else "circle"


def position_of(cx, cy):
    mid = SIZE / 2
    dx, dy = cx - mid, cy - mid
    if max(abs(dx), abs(dy)) < 5:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def size_of(radius):
    if radius < 12:
        return "small"
    if radius > 16.5:
        return "large"
    return "medium"


def check(img, spec):
    """Which of the prompt's statements the picture satisfies; `all` when every one does."""
    m = measure(img)
    found = "extent" in m
    r = {
        "background": m["background"] == spec["background"],
        "color": found and m["color"] == spec["color"],
        "shape": found and m["shape"] == spec["shape"],
        "position": spec.get("position") is None
        or (found and position_of(m["cx"], m["cy"]) == spec["position"]),
        "size": spec.get("size") is None or (found and size_of(m["radius"]) == spec["size"]),
    }
    r["all"] = all(r.values())
    return r


# --------------------------------------------------------------------------------------------
# Model definitions

# Stable Diffusion's scaled-linear betas, rescaled to zero terminal SNR (Lin et al. 2024,
# "Common Diffusion Noise Schedules and Sample Steps Are Flawed"). At 16x16 latents the
# standard schedule leaks the picture's mean colour through its last timestep: a model trained
# on it reads the background from the noise instead of the prompt, and from pure noise at
# sampling time draws a random background. With zero terminal SNR the first step sees no
# signal, so the layout has to come from the text; this needs v-prediction.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "rescale_betas_zero_snr": True,
}
PREDICTION = "v_prediction"
# The sampler the model ships with: DPM++ 2M, starting at the last training timestep
# ("trailing", as the paper above prescribes). `latent generate`'s 30 steps are ample.
SHIPPED_SCHEDULER = dict(
    SCHEDULE,
    prediction_type=PREDICTION,
    algorithm_type="dpmsolver++",
    solver_order=2,
    timestep_spacing="trailing",
)


def vae_kwargs():
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=[16, 32, 64],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=SIZE,
    )


def unet_kwargs(channels):
    return dict(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        # Attention at 8x8 and 4x4 only (as SDXL skips its highest resolution): the 16x16
        # transformers would cost 40% of the training time for little gain on flat shapes.
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        # diffusers' legacy name: the number of attention heads.
        attention_head_dim=4,
        cross_attention_dim=64,
        norm_num_groups=16,
    )


def text_config():
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=64,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    cfg.architectures = ["CLIPTextModel"]
    return cfg


# --------------------------------------------------------------------------------------------
# Tokenizer: the real CLIP BPE, rebuilt offline from open_clip's merges file


def default_bpe_path():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def byte_chars():
    """CLIP's (and GPT-2's) byte-level alphabet in vocabulary order: the printable Latin-1
    bytes as themselves, then the other 68 bytes as the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(256 - len(keep))]


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_tokenizer(dir_, bpe_path):
    """Hub-style tokenizer files (vocab.json + merges.txt + configs), SD 1.x padding."""
    dir_.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + [BOS, EOS])}
    assert len(vocab) == 49408, len(vocab)
    (dir_ / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dir_ / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                     encoding="utf-8")
    special = {
        "bos_token": added_token(BOS),
        "eos_token": added_token(EOS),
        "pad_token": EOS,
        "unk_token": added_token(EOS),
    }
    (dir_ / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = dict(special, add_prefix_space=False, do_lower_case=True, errors="replace",
                  model_max_length=MAX_LEN, tokenizer_class="CLIPTokenizer")
    (dir_ / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True)
                                                 + "\n")
    tok = CLIPTokenizer.from_pretrained(dir_)
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    return tok


def token_ids(tok, texts):
    return tok(list(texts), padding="max_length", max_length=MAX_LEN, truncation=True,
               return_tensors="pt").input_ids


# --------------------------------------------------------------------------------------------
# Training


def log(msg, t0=[time.time()]):
    print(f"[{time.time() - t0[0]:7.1f}s] {msg}", flush=True)


def cosine_lr(step, total, warmup, peak, floor=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def to_tensor(images, device):
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, images, steps, batch, gen, device, crop=SIZE, peak_lr=1e-3):
    """With crop < SIZE, trains on random crop x crop windows (on the 8-pixel grid): the
    autoencoder is convolutional, and a quarter of the pixels per sample buys four times the
    steps. tools/demo_data_check.py measured what that buys: 1800 steps of 16 32x32 crops at
    2e-3 keep the shape class of 97% of the pictures, the shipped VAE (400 steps of 12 whole
    pictures at 1e-3) of about half."""
    opt = torch.optim.AdamW(vae.parameters(), lr=peak_lr, weight_decay=0.0)
    n = len(images)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 50, peak_lr)
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = to_tensor(images[idx.numpy()], device)
        if crop < SIZE:
            oy, ox = (torch.randint(0, (SIZE - crop) // 8 + 1, (2,), generator=gen) * 8).tolist()
            x = x[:, :, oy : oy + crop, ox : ox + crop]
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(post.mean + post.std * eps).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        # A light KL term keeps the latents smooth without costing reconstruction.
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            psnr = -10 * math.log10(F.mse_loss(rec, x).item() / 4)
            log(f"vae step {step}/{steps}: rec {rec_loss.item():.4f} kl {kl.item():.3f} "
                f"psnr {psnr:.1f} dB")
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images, device, batch=256):
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.encode(to_tensor(images[i : i + batch], device)).latent_dist.mean)
    return torch.cat(out)


def vae_stage(images, args):
    """Trains the VAE and encodes the dataset, or loads both from --work when a run with the
    same settings left them there."""
    key = (f"vae-s{args.seed}-n{args.images}-{args.vae_steps}x{args.vae_batch}"
           f"-c{args.vae_crop}-lr{args.vae_lr}-v{DATA_VERSION}")
    cache = args.work / f"{key}.pt" if args.work else None
    vae = AutoencoderKL(**vae_kwargs())
    if cache and cache.is_file():
        saved = torch.load(cache)
        vae.load_state_dict(saved["vae"])
        vae.register_to_config(scaling_factor=saved["scaling_factor"])
        log(f"vae and latents from {cache} (trained in {saved['seconds'] / 60:.1f} min)")
        return vae.to(args.device).eval(), saved["latents"]
    started = time.time()
    gen = torch.Generator().manual_seed(args.seed + 1)
    vae = train_vae(vae.to(args.device), images, args.vae_steps, args.vae_batch, gen, args.device,
                    args.vae_crop, args.vae_lr)
    latents = encode_latents(vae, images, args.device).cpu()
    # Stable Diffusion's convention: scale latents to unit variance (scaling_factor).
    sf = float(f"{1.0 / latents.std().item():.5f}")
    vae.register_to_config(scaling_factor=sf)
    latents = latents * sf
    seconds = time.time() - started
    log(f"latents {tuple(latents.shape)}, scaling_factor {sf}; vae stage {seconds / 60:.1f} min")
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"vae": vae.state_dict(), "scaling_factor": sf, "latents": latents,
                    "seconds": seconds}, cache)
    return vae, latents


def make_pipeline(vae, unet, text_encoder, tok):
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=DPMSolverMultistepScheduler.from_config(
                                       SHIPPED_SCHEDULER),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def round_to_half_(*models):
    """Rounds every weight to float16 and back, as the saved files hold them."""
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.copy_(p.to(torch.float16).to(torch.float32))


def train_unet(latents, specs, tok, args, vae=None):
    """Trains the UNet and the text encoder in phases (steps, peak learning rate). Each phase
    has a warmup and a cosine decay and its own seeded generators; a later phase starts from
    the previous phase's EMA weights rounded to float16 (what a saved model holds), with a new
    optimizer. So `--resume-from DIR --start-phase k` on the model saved after phase k - 1
    continues exactly as one run through all phases would."""
    device = args.device
    if args.resume_from:
        unet = UNet2DConditionModel.from_pretrained(args.resume_from, subfolder="unet",
                                                    torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(args.resume_from, subfolder="text_encoder",
                                                     torch_dtype=torch.float32)
        log(f"phase {args.start_phase} starts from {args.resume_from}")
    else:
        unet = UNet2DConditionModel(**unet_kwargs(args.channels))
        text_encoder = CLIPTextModel(text_config())
    # channels_last: oneDNN's convolutions run ~14% faster on the CPU in that layout, but the
    # sums come out in another order, so the shipped run (contiguous) is not reproduced exactly.
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    unet = unet.to(device, memory_format=layout).train()
    text_encoder = text_encoder.to(device).train()
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    log(f"unet {n_unet / 1e6:.2f}M parameters, text encoder {n_text / 1e6:.2f}M")
    noise_sched = DDPMScheduler(**SCHEDULE, prediction_type=PREDICTION)
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # The v-loss weighs the x0 error by snr + 1; capping that at --snr-cap, 5 by default (a
    # min-SNR-5 variant that keeps full weight on the noisy steps, where the layout is decided),
    # stops the almost clean steps from dominating.
    weights = torch.clamp(args.snr_cap / (snr + 1.0), max=1.0) if args.snr_cap else \
        torch.ones_like(snr)
    latents = latents.to(device)
    n, batch = len(latents), args.unet_batch
    params = list(unet.parameters()) + list(text_encoder.parameters())
    done = sum(steps for steps, _ in args.phases[: args.start_phase])
    ema_unet = ema_text = None
    for phase, (steps, peak_lr) in enumerate(args.phases):
        if phase < args.start_phase:
            continue
        if ema_unet is not None:
            round_to_half_(ema_unet, ema_text)
            unet.load_state_dict(ema_unet.state_dict())
            text_encoder.load_state_dict(ema_text.state_dict())
        ema_unet = copy.deepcopy(unet).requires_grad_(False)
        ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
        ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
        opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0, fused=True)
        gen = torch.Generator().manual_seed(args.seed + 2 + 10 * phase)
        rng = np.random.default_rng(args.seed + 3 + 10 * phase)
        running = None
        started = time.time()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, steps, 100, peak_lr)
            idx = torch.randint(0, n, (batch,), generator=gen)
            x0 = latents[idx.to(device)]
            # Classifier-free guidance: 10% of captions are empty (--uncond).
            caps = [caption(specs[i], rng) if rng.random() >= args.uncond else ""
                    for i in idx.tolist()]
            ids = token_ids(tok, caps).to(device)
            # By default (--t-power 0.5) timesteps with density rising linearly towards pure
            # noise: the noisy half, where the prompt decides colours, shape and place, gets 3/4
            # of the samples.
            u = torch.rand((batch,), generator=gen)
            t = (u ** args.t_power * args.t_max).long().clamp(max=args.t_max - 1)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = t.to(device)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).contiguous(memory_format=layout)
            target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v (Salimans & Ho 2022)
            context = text_encoder(ids).last_hidden_state
            pred = unet(xt, t, context).sample
            per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
            loss = (per * weights[t]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_mul_(ema_params, decay)
                torch._foreach_add_(ema_params, [p.detach() for p in params], alpha=1 - decay)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            done += 1
            if step % 100 == 0 or step == steps - 1:
                rate = (step + 1) * batch / (time.time() - started)
                log(f"unet phase {phase} step {step}/{steps}: loss {running:.4f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} ({rate:.0f} samples/s)")
            if vae is not None and done in args.eval_at:
                pipe = make_pipeline(vae, ema_unet.eval(), ema_text.eval(), tok).to(device)
                grid = args.grid.with_name(f"{args.grid.stem}-{done}.png") if args.grid else None
                evaluate(pipe, 1, args.eval_steps, args.guidance, device, grid,
                         label=f"step {done}")
    return ema_unet.eval(), ema_text.eval()


# --------------------------------------------------------------------------------------------
# Saving in the diffusers layout


def half_state_dict(model, prefix=""):
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if prefix and not k.startswith(prefix):
            k = prefix + k
        out[k] = v.detach().cpu().to(torch.float16).contiguous()
    return out


def save_model(out, tok, vae, unet, text_encoder, bpe_path):
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    meta = {"format": "pt"}
    write_tokenizer(out / "tokenizer", bpe_path)
    unet.save_config(out / "unet")
    save_file(half_state_dict(unet), out / "unet" / "diffusion_pytorch_model.safetensors", meta)
    vae.save_config(out / "vae")
    save_file(half_state_dict(vae), out / "vae" / "diffusion_pytorch_model.safetensors", meta)
    text_encoder.config.save_pretrained(out / "text_encoder")
    # transformers 5 drops the `text_model.` prefix when saving; hub files (and latent) use it.
    save_file(half_state_dict(text_encoder, "text_model."),
              out / "text_encoder" / "model.safetensors", meta)
    pipe = make_pipeline(vae, unet, text_encoder, tok)
    pipe.scheduler.save_config(out / "scheduler")
    pipe.save_config(out)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved {out} ({total / 1e6:.2f} MB)")


# --------------------------------------------------------------------------------------------
# Evaluation through diffusers' pipeline


def spec_of(entry):
    _, shape, color, bg, pos, size = entry
    return {"shape": shape, "color": color, "background": bg, "position": pos, "size": size}


@torch.no_grad()
def evaluate(pipe, seeds_per_prompt, steps, guidance, device, grid_path=None, label="final"):
    """Scores the fixed evaluation prompts. Prompt i of the combined list (trained, then
    held-out) is drawn with seed EVAL_SEED + i, as in tests/demo.rs; extra images per prompt use
    seed + 1000 k."""
    pipe.set_progress_bar_config(disable=True)
    results, rows = {}, []
    for name, entries, offset in (("trained", EVAL_TRAINED, 0),
                                  ("held-out", EVAL_HELD_OUT, len(EVAL_TRAINED))):
        attrs = ["all", "shape", "color", "background", "position", "size"]
        per_attr = dict.fromkeys(attrs, 0)
        first_ok, total, misses = 0, 0, []
        for i, entry in enumerate(entries):
            seeds = [EVAL_SEED + offset + i + 1000 * k for k in range(seeds_per_prompt)]
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            # One generator per image (diffusers' list form), as latent draws its noise.
            latents = torch.cat([torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=g)
                                 for g in gens])
            images = pipe(entry[0], num_inference_steps=steps, guidance_scale=guidance,
                          num_images_per_prompt=len(seeds), latents=latents.to(device),
                          output_type="np").images
            images = (np.asarray(images) * 255).round().astype(np.uint8)
            rows.append(images)
            for k, img in enumerate(images):
                r = check(img, spec_of(entry))
                for a in attrs:
                    per_attr[a] += r[a]
                total += 1
                if k == 0:
                    first_ok += r["all"]
                    if not r["all"]:
                        m = measure(img)
                        misses.append(f"{entry[0]!r}: saw {m.get('color')} {m.get('shape')} on "
                                      f"{m.get('background')} (failed "
                                      f"{', '.join(a for a in attrs[1:] if not r[a])})")
        results[name] = {
            "test_seeds": [first_ok, len(entries)],
            "all_seeds": [per_attr["all"], total],
            "per_attribute": {a: round(v / total, 3) for a, v in per_attr.items()},
        }
        log(f"eval [{label}] {name}: test seeds {first_ok}/{len(entries)}; "
            f"{seeds_per_prompt} seeds/prompt {per_attr['all']}/{total} "
            f"({100 * per_attr['all'] / total:.0f}%) {results[name]['per_attribute']}")
        for m in misses:
            log(f"    miss {m}")
    if grid_path:
        grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
        Image.fromarray(grid).save(grid_path)
    return results


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "weights" / "demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (the shipped model: 2; 1 is faster on a busy 2-core machine)")
    ap.add_argument("--device", default="cpu", help="torch device (the shipped model: cpu)")
    ap.add_argument("--bpe", type=Path, default=default_bpe_path(),
                    help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--images", type=int, default=15000, help="dataset size")
    ap.add_argument("--vae-steps", type=int, default=1800)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-crop", type=int, default=32,
                    help="train the VAE on random crops of this side (multiple of 8)")
    ap.add_argument("--vae-lr", type=float, default=2e-3, help="VAE peak learning rate")
    ap.add_argument("--phases", type=lambda s: [(int(a), float(b)) for a, b in
                                                (p.split(":") for p in s.split(","))],
                    default=[(5000, 1e-3), (3000, 5e-4), (4000, 4e-4)],
                    help="UNet training phases, steps:peak_lr,...")
    ap.add_argument("--start-phase", type=int, default=0)
    ap.add_argument("--resume-from", type=Path, default=None,
                    help="a model saved after phase --start-phase - 1")
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")],
                    default=[32, 64, 128], help="UNet block_out_channels")
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--t-max", type=int, default=SCHEDULE["num_train_timesteps"],
                    help="draw training timesteps below this one only")
    ap.add_argument("--t-power", type=float, default=0.5,
                    help="timesteps drawn as t_max u^p: 0.5 favours the noisy end, 1 is uniform")
    ap.add_argument("--snr-cap", type=float, default=5.0,
                    help="weight the v-loss by min(1, cap / (SNR + 1)); 0: unweighted")
    ap.add_argument("--uncond", type=float, default=0.1,
                    help="share of empty captions (classifier-free guidance dropout)")
    ap.add_argument("--channels-last", action="store_true",
                    help="train the UNet in channels_last (~14%% faster; not the shipped run)")
    ap.add_argument("--eval-seeds", type=int, default=4, help="images per evaluation prompt")
    ap.add_argument("--eval-steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--eval-at", type=lambda s: {int(x) for x in s.split(",") if x},
                    default=set(), help="also score the EMA weights after these UNet steps")
    ap.add_argument("--work", type=Path, default=None,
                    help="cache the trained VAE and the latents here (and reuse them)")
    ap.add_argument("--stop-after-vae", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="only score the model in --out")
    ap.add_argument("--grid", type=Path, default=None, help="save the evaluation images here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} threads, {args.device}")

    if not args.eval_only:
        if args.bpe is None or not Path(args.bpe).is_file():
            raise SystemExit("the CLIP merges file was not found: install open_clip_torch or "
                             "pass --bpe")
        started = time.time()
        # One generator per stage, so a cached stage leaves the later ones unchanged.
        data_rng = np.random.default_rng(args.seed)
        specs = [sample_spec(data_rng) for _ in range(args.images)]
        images = np.stack([render(s, data_rng) for s in specs])
        log(f"dataset: {len(images)} images, {len(trained_combos())} trained combinations, "
            f"{len(HELD_OUT)} held out")
        vae, latents = vae_stage(images, args)
        if args.stop_after_vae:
            return
        tok = write_tokenizer(Path(f"/tmp/latent-demo-tokenizer-{os.getpid()}"), args.bpe)
        unet, text_encoder = train_unet(latents, specs, tok, args, vae)
        train_time = time.time() - started
        log(f"training took {train_time / 60:.1f} min")
        save_model(args.out, tok, vae.cpu(), unet.cpu(), text_encoder.cpu(), args.bpe)
    pipe = StableDiffusionPipeline.from_pretrained(args.out, safety_checker=None,
                                                   requires_safety_checker=False,
                                                   torch_dtype=torch.float32).to(args.device)
    results = evaluate(pipe, args.eval_seeds, args.eval_steps, args.guidance, args.device,
                       args.grid)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
