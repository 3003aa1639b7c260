#!/usr/bin/env python3
"""Checks the demo model's checker (tools/train_demo.py `check`, mirrored by tests/demo.rs) on
pictures whose answer is known: freshly drawn training pictures, and the same pictures after a
round trip through the VAE of a trained model folder. If the checker misreads these, a model
cannot score well however well it draws; if it reads the drawings but not the reconstructions,
the VAE loses the shapes.

  HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/demo_data_check.py [--model weights/demo] [-n 400]
"""

import argparse
import collections
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("train_demo", REPO / "tools" / "train_demo.py")
td = importlib.util.module_from_spec(spec)
sys.modules["train_demo"] = td
spec.loader.exec_module(td)


def report(label, specs, images):
    """Per attribute accuracy, and the shape confusion per size class."""
    attrs = ["all", "shape", "color", "background", "position", "size"]
    ok = dict.fromkeys(attrs, 0)
    confusion = collections.Counter()
    per_size = collections.Counter()
    per_size_n = collections.Counter()
    for s, img in zip(specs, images):
        r = td.check(img, s)
        for a in attrs:
            ok[a] += r[a]
        m = td.measure(img)
        confusion[(s["shape"], m.get("shape"))] += 1
        per_size[s["size"]] += r["shape"]
        per_size_n[s["size"]] += 1
    n = len(specs)
    print(f"{label}: " + ", ".join(f"{a} {100 * ok[a] / n:.1f}%" for a in attrs))
    print("  shape right per size: " + ", ".join(
        f"{z} {100 * per_size[z] / per_size_n[z]:.1f}%" for z in per_size_n))
    for shape in td.SHAPES:
        row = {k[1]: v for k, v in confusion.items() if k[0] == shape}
        print(f"  {shape:9s} read as {row}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "weights" / "demo")
    ap.add_argument("-n", type=int, default=400, help="pictures to draw")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    specs = [td.sample_spec(rng) for _ in range(args.n)]
    images = np.stack([td.render(s, rng) for s in specs])
    report("drawn", specs, images)
    if (args.model / "vae").is_dir():
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae",
                                            torch_dtype=torch.float32).eval()
        with torch.no_grad():
            x = td.to_tensor(images, "cpu")
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        report(f"through {args.model}/vae", specs, rec)


if __name__ == "__main__":
    main()
