#!/usr/bin/env bash
# Side-by-side benchmark: `latent bench` and diffusers (PyTorch CPU) on the same random-weight
# SD 1.5 checkpoint, same size, steps, guidance and threads, one after the other; prints both
# and the ratios latent/diffusers (lower is better for latent).
#
#   tools/bench.sh [SIZE=256] [STEPS=4] [THREADS=2]
# DTYPE=bf16 runs latent with bf16 products (diffusers stays fp32, the anchor); PROFILE=1 adds
# latent's per-operation profile.
# Needs: a Python with torch + diffusers (PYTHON, default /work/venv/bin/python); the model is
# built by tools/make_random_sd15.py into SD15_DIR (default ../sd15-random) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-256}; STEPS=${2:-4}; THREADS=${3:-2}
PYTHON=${PYTHON:-/work/venv/bin/python}
SD15_DIR=${SD15_DIR:-../sd15-random}
export HF_HUB_OFFLINE=1
[ -f "$SD15_DIR/model_index.json" ] || "$PYTHON" tools/make_random_sd15.py "$SD15_DIR"
cargo build --release --quiet
DTYPE=${DTYPE:-f32}
ours=$(./target/release/latent bench --model "$SD15_DIR" -W "$SIZE" -H "$SIZE" --steps "$STEPS" \
  --scheduler euler --threads "$THREADS" --dtype "$DTYPE" --json ${PROFILE:+--profile})
theirs=$("$PYTHON" tools/bench_diffusers.py "$SD15_DIR" --width "$SIZE" --height "$SIZE" \
  --steps "$STEPS" --threads "$THREADS")
"$PYTHON" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{a['width']}x{a['height']}, {a['threads']} threads, latent {a['dtype']} ({a['kernels']}) vs {b['tool']} fp32")
print(f"{'stage':<14}{'latent':>12}{'diffusers':>12}{'ratio':>8}")
for k, label in [("load_s", "load s"), ("text_encode_s", "text s"), ("step_s_median", "UNet step s"),
                 ("decode_s", "decode s"), ("peak_rss_bytes", "peak RSS GB")]:
    x, y = a[k], b[k]
    if k == "peak_rss_bytes":
        x, y = x / 1e9, y / 1e9
    print(f"{label:<14}{x:>12.3f}{y:>12.3f}{x / y:>8.2f}")
for stage, rows in a.get("profile", {}).items():
    print(f"latent profile, {stage}:")
    for r in rows:
        print(f"  {r['op']:<30}{r['s']:8.3f} s" + (f"  {r['gflops']:6.1f} GFLOP/s" if r['gflops'] else ""))
PY
