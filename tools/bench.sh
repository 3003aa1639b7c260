#!/usr/bin/env bash
# Side-by-side benchmark: `latent bench` and diffusers (PyTorch CPU) on the same random-weight
# checkpoint (SD 1.5 or SDXL), same size, steps, guidance, scheduler and threads, one run after the
# other; prints both and the ratios latent/diffusers (lower is better for latent).
#
#   tools/bench.sh [SIZE] [STEPS=4] [THREADS=2]
#   DTYPES="f32 bf16" tools/bench.sh 512 4 2
#   MODEL=sdxl DTYPES="f32 bf16" tools/bench.sh 1024 2
#
# SIZE defaults to half the model's native size: 256 for sd15, 512 for sdxl.
# Variables (default in brackets; relative paths are from the repository root):
#   MODEL             sd15 | sdxl [sd15]
#   DTYPES            latent's precisions, one run each [$DTYPE, else f32], e.g. "f32 bf16"
#   DIFFUSERS_DTYPES  diffusers' precisions, one run each [fp32 bf16]; bf16 loads the pipeline with
#                     torch_dtype=torch.bfloat16 (oneDNN bf16 kernels: AMX or AVX512-BF16).
#                     Paired columns: latent f32 with diffusers fp32, latent bf16 with bf16
#                     (latent f16 with fp32, as diffusers has no usable f16 on CPU).
#   GUIDANCE [7.5]    SCHEDULER [euler]    PROMPT [bench default]
#   VAE               a folder (AutoencoderKL or AutoencoderTiny) replacing the model's VAE on both
#                     sides [none], e.g. VAE=../taesdxl-random
#   SD15_DIR [../sd15-random]  SDXL_DIR [../sdxl-random]   built by tools/make_random_sd15.py /
#                     tools/make_random_sdxl.py when missing (SDXL: ~6.5 GB of float16 files)
#   PYTHON [python3]  a Python with torch + diffusers + transformers + accelerate
#   SKIP_LATENT=1     diffusers only (no cargo build);  SKIP_DIFFUSERS=1  latent only
#   PROFILE=1         adds latent's per-operation profile
#   OUT               folder that keeps each run's JSON record [a new temporary folder]
# Memory: diffusers' SDXL in fp32 holds ~14 GB of weights (UNet 10.3 GB); runs go one at a time.
# A run that fails (e.g. a latent without SDXL support) is reported and left out of the table.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-sd15}
case "$MODEL" in
  sd15) DIR=${SD15_DIR:-../sd15-random}; MAKE=tools/make_random_sd15.py; NATIVE=512 ;;
  sdxl) DIR=${SDXL_DIR:-../sdxl-random}; MAKE=tools/make_random_sdxl.py; NATIVE=1024 ;;
  *) echo "MODEL must be sd15 or sdxl (SD-Turbo: tools/bench_turbo.sh)" >&2; exit 2 ;;
esac
SIZE=${1:-$((NATIVE / 2))}; STEPS=${2:-4}; THREADS=${3:-2}
PYTHON=${PYTHON:-python3}
DTYPES=${DTYPES:-${DTYPE:-f32}}
DIFFUSERS_DTYPES=${DIFFUSERS_DTYPES:-fp32 bf16}
GUIDANCE=${GUIDANCE:-7.5}; SCHEDULER=${SCHEDULER:-euler}
PROMPT=${PROMPT:-a photo of an astronaut riding a horse on mars}
OUT=${OUT:-$(mktemp -d -t latent-bench.XXXXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
[ -f "$DIR/model_index.json" ] || "$PYTHON" "$MAKE" "$DIR"

note() { echo "[bench] $*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

if [ -z "${SKIP_LATENT:-}" ]; then
  cargo build --release --quiet
  for d in $DTYPES; do
    note "latent $d: load average $(load)"
    if ./target/release/latent bench "$PROMPT" --model "$DIR" -W "$SIZE" -H "$SIZE" --steps "$STEPS" \
        --guidance "$GUIDANCE" --scheduler "$SCHEDULER" --threads "$THREADS" --dtype "$d" \
        ${VAE:+--vae "$VAE"} --json ${PROFILE:+--profile} >"$OUT/latent-$d.json"; then :
    else note "latent $d failed (exit $?)"; rm -f "$OUT/latent-$d.json"; fi
  done
fi
if [ -z "${SKIP_DIFFUSERS:-}" ]; then
  for d in $DIFFUSERS_DTYPES; do
    note "diffusers $d: load average $(load)"
    if "$PYTHON" tools/bench_diffusers.py "$DIR" --prompt "$PROMPT" --width "$SIZE" --height "$SIZE" \
        --steps "$STEPS" --guidance "$GUIDANCE" --scheduler "$SCHEDULER" --threads "$THREADS" \
        --dtype "$d" ${VAE:+--vae "$VAE"} >"$OUT/diffusers-$d.json"; then :
    else note "diffusers $d failed (exit $?)"; rm -f "$OUT/diffusers-$d.json"; fi
  done
fi
note "JSON records in $OUT"

"$PYTHON" - "$OUT" "$MODEL" "$DTYPES" "$DIFFUSERS_DTYPES" <<'PY'
import json, sys
from pathlib import Path
out, model, ours, theirs = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
def rec(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None
match = {"f32": "fp32", "bf16": "bf16", "f16": "fp32"}
cols, used = [], set()
for d in ours:
    t = match.get(d, "fp32") if match.get(d, "fp32") in theirs else None
    used.add(t)
    cols.append((f"latent {d}", rec(f"latent-{d}"),
                 f"diffusers {t}" if t else None, rec(f"diffusers-{t}") if t else None))
for t in theirs:
    if t not in used:
        cols.append((None, None, f"diffusers {t}", rec(f"diffusers-{t}")))
any_rec = next((r for c in cols for r in (c[1], c[3]) if r), None)
if any_rec is None:
    sys.exit("no run succeeded")
g = any_rec.get("guidance", "")
print(f"{model} {any_rec['width']}x{any_rec['height']}, {any_rec['steps']} steps, guidance {g}, "
      f"{any_rec['threads']} threads")
for name, r, _, _ in cols:
    if r and "kernels" in r:
        print(f"{name}: {r['kernels']}")
for _, _, name, r in cols:
    if r:
        print(f"{name}: {r['tool']}, {r['pipeline']}, {r['vae']}, {r['scheduler']}; "
              f"load average {r['loadavg_1m_start']:.2f} -> {r['loadavg_1m_end']:.2f}")
rows = [("load_s", "load s"), ("text_encode_s", "text s"), ("step_s_median", "UNet step s"),
        ("decode_s", "decode s"), ("peak_rss_bytes", "peak RSS GB")]
head = f"{'stage':<14}"
for a, _, b, _ in cols:
    head += (f"{a:>14}" if a else "") + (f"{b:>16}" if b else "") + (f"{'ratio':>7}" if a and b else "")
print(head)
def val(r, k):
    if not r or k not in r:
        return None
    return r[k] / 1e9 if k == "peak_rss_bytes" else r[k]
for k, label in rows:
    line = f"{label:<14}"
    for a, ra, b, rb in cols:
        x, y = val(ra, k), val(rb, k)
        if a:
            line += f"{x:>14.3f}" if x is not None else f"{'-':>14}"
        if b:
            line += f"{y:>16.3f}" if y is not None else f"{'-':>16}"
        if a and b:
            line += f"{x / y:>7.2f}" if x is not None and y else f"{'-':>7}"
    print(line)
cpu = [(b, rb) for _, _, b, rb in cols if b and rb]
if cpu:
    print("diffusers CPU seconds (all threads; / threads = wall on idle cores): " + "; ".join(
        f"{b}: step {r['step_cpu_s_median']:.2f}, decode {r['decode_cpu_s']:.2f}" for b, r in cpu))
for name, r, _, _ in cols:
    for stage, prof in (r or {}).get("profile", {}).items():
        print(f"{name} profile, {stage}:")
        for p in prof:
            print(f"  {p['op']:<30}{p['s']:8.3f} s" + (f"  {p['gflops']:6.1f} GFLOP/s" if p['gflops'] else ""))
PY
