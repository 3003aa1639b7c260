"""Writes tests/fixtures/noise/torch_randn.safetensors: golden torch CPU noise for `latent::noise`.

Every tensor is what `torch.randn(shape, generator=g, dtype=torch.float32)` returns for a
`torch.Generator("cpu").manual_seed(seed)`. The file's metadata holds the versions and the list
of cases (which seed, which calls in which order), so tests/noise.rs can replay each one.

Usage (from the repository root):
    HF_HUB_OFFLINE=1 "${PYTHON:-python3}" tools/make_noise_fixtures.py [--out tests/fixtures/noise/torch_randn.safetensors]

The values depend on the CPU kernel torch picks: on x86 machines with AVX2 or AVX-512 it is the
AVX2 kernel (Cephes-style polynomials), the one `latent` reproduces. The script refuses to run
under another kernel rather than write fixtures the tests would not match.
"""

import argparse
import json
import platform
import sys

import numpy
import safetensors
import torch
from safetensors.torch import save_file

# Seeds: the usual ones, one above 2**32 (torch seeds mt19937 with the low 32 bits only) and the
# same seed's low half, so the test can show both give the same numbers.
SEEDS = [0, 1, 42, 2**32 + 5, 5, 123456789]

# numel 256 and 16384: multiples of 16; 240, 252, 17: not (the last 16 values are redrawn);
# 3 and 4: below 16 (double-precision Box-Muller, one value cached in the generator).
SMALL_SHAPES = [(1, 4, 8, 8), (1, 4, 6, 10), (3,), (1, 4, 1, 1), (17,), (1, 4, 7, 9)]
# The 512x512 latent size; only for two seeds to keep the file small.
LARGE_SHAPE = (1, 4, 64, 64)
LARGE_SEEDS = [0, 42]

# Several randn calls on one generator, in order: the stream must continue across calls, and a
# call below 16 elements leaves a cached normal that only the next call below 16 consumes.
SEQUENCES = [
    (7, [(3,), (1, 4, 8, 8), (1,), (5,), (17,), (2,), (1,)]),
    (2024, [(1, 4, 7, 9), (1, 4, 7, 9)]),
    (99, [(1,), (1, 4, 6, 10), (1,), (1,)]),
]

# diffusers' randn_tensor with a list of generators: one torch.randn((1, ...)) per generator.
BATCHES = [([42, 43, 44], (3, 4, 8, 10))]


def randn(gen, shape):
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def name_of(shape):
    return "x".join(str(d) for d in shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/noise/torch_randn.safetensors")
    args = parser.parse_args()

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        sys.exit(f"torch uses the {capability} CPU kernel here; these fixtures need AVX2 or AVX512")

    tensors = {}
    streams = []

    def add_stream(seed, shapes, prefix):
        gen = torch.Generator("cpu").manual_seed(seed)
        calls = []
        for j, shape in enumerate(shapes):
            name = f"{prefix}/call{j}_{name_of(shape)}" if len(shapes) > 1 else f"{prefix}/{name_of(shape)}"
            tensors[name] = randn(gen, shape).contiguous()
            calls.append({"tensor": name, "shape": list(shape)})
        streams.append({"seed": seed, "calls": calls})

    for seed in SEEDS:
        for shape in SMALL_SHAPES:
            add_stream(seed, [shape], f"single/seed{seed}")
    for seed in LARGE_SEEDS:
        add_stream(seed, [LARGE_SHAPE], f"single/seed{seed}")
    for k, (seed, shapes) in enumerate(SEQUENCES):
        add_stream(seed, shapes, f"sequence{k}/seed{seed}")

    batches = []
    from diffusers.utils.torch_utils import randn_tensor

    for seeds, shape in BATCHES:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        name = f"batch/seeds{'_'.join(map(str, seeds))}/{name_of(shape)}"
        tensors[name] = randn_tensor(shape, generator=gens, dtype=torch.float32).contiguous()
        batches.append({"seeds": seeds, "tensor": name, "shape": list(shape)})

    # Recorded, not assumed: torch keeps only the low 32 bits of the seed.
    low_bits_only = all(
        torch.equal(tensors[f"single/seed{2**32 + 5}/{name_of(s)}"], tensors[f"single/seed5/{name_of(s)}"])
        for s in SMALL_SHAPES
    )

    import diffusers

    metadata = {
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "safetensors_version": safetensors.__version__,
        "numpy_version": numpy.__version__,
        "python_version": platform.python_version(),
        "cpu_capability": capability,
        "machine": platform.machine(),
        "seed_low_32_bits_only": str(low_bits_only).lower(),
        "cases": json.dumps({"streams": streams, "batches": batches}),
    }
    save_file(tensors, args.out, metadata=metadata)
    total = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.out}: {len(tensors)} tensors, {total} floats, torch {torch.__version__} ({capability})")


if __name__ == "__main__":
    main()
