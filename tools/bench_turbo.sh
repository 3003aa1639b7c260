#!/usr/bin/env bash
# SD-Turbo side by side: latent vs diffusers (PyTorch CPU) on the same random-weight SD-Turbo
# (SD 2.1-base architecture) with a random-weight tiny VAE (TAESD's architecture), 512x512, 1 step,
# no classifier-free guidance, Euler ancestral; in f32 and bf16. The headline is seconds per image:
#   - with the model loaded: latent `bench --resident` (text + step + decode) vs diffusers' pipeline
#     call (prompt in, PIL image out; median of the runs after the first);
#   - cold: `latent generate` as a process (start, load, image, PNG), timed with /usr/bin/time,
#     vs diffusers from process start to the first image (imports and load included).
#
#   tools/bench_turbo.sh [THREADS=2]
#
# Variables (default in brackets; relative paths are from the repository root):
#   TURBO_DIR [../sd-turbo-random]  TAESD_DIR [../taesd-random]   built by tools/make_random_turbo.py
#                                   when missing
#   DTYPES [f32 bf16]               latent's precisions; diffusers runs the matching fp32 / bf16
#   DIFFUSERS_DTYPES [fp32 bf16]
#   SIZE [512]  STEPS [1]  GUIDANCE [0]  SCHEDULER [euler-a]  PROMPT [a photo of a cat]
#   REPEAT [3]                      images per diffusers run, and `latent generate` runs per dtype
#   PYTHON [python3]  a Python with torch + diffusers + transformers + accelerate
#   SKIP_LATENT=1 / SKIP_DIFFUSERS=1  one side only
#   OUT                             folder that keeps JSON records and images [a new temporary folder]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
PYTHON=${PYTHON:-python3}
TURBO_DIR=${TURBO_DIR:-../sd-turbo-random}
TAESD_DIR=${TAESD_DIR:-../taesd-random}
DTYPES=${DTYPES:-f32 bf16}
DIFFUSERS_DTYPES=${DIFFUSERS_DTYPES:-fp32 bf16}
SIZE=${SIZE:-512}; STEPS=${STEPS:-1}; GUIDANCE=${GUIDANCE:-0}; SCHEDULER=${SCHEDULER:-euler-a}
PROMPT=${PROMPT:-a photo of a cat}
REPEAT=${REPEAT:-3}
OUT=${OUT:-$(mktemp -d -t latent-turbo.XXXXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
if [ ! -f "$TURBO_DIR/model_index.json" ]; then
  "$PYTHON" tools/make_random_turbo.py "$TURBO_DIR" --vae-tiny "$TAESD_DIR"
elif [ ! -f "$TAESD_DIR/config.json" ]; then
  "$PYTHON" tools/make_random_turbo.py --vae-tiny "$TAESD_DIR" --only-vae-tiny
fi

note() { echo "[bench-turbo] $*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
COMMON=(--model "$TURBO_DIR" --vae "$TAESD_DIR" --steps "$STEPS" --guidance "$GUIDANCE" -W "$SIZE" -H "$SIZE"
        --scheduler "$SCHEDULER")

if [ -z "${SKIP_LATENT:-}" ]; then
  cargo build --release --quiet
  for d in $DTYPES; do
    note "latent bench $d: load average $(load)"
    if ./target/release/latent bench "$PROMPT" "${COMMON[@]}" --threads "$THREADS" --dtype "$d" --resident \
        --json >"$OUT/latent-$d.json"; then :
    else note "latent bench $d failed (exit $?)"; rm -f "$OUT/latent-$d.json"; fi
    : >"$OUT/latent-generate-$d.txt"
    for i in $(seq "$REPEAT"); do
      note "latent generate $d ($i/$REPEAT): load average $(load)"
      if RAYON_NUM_THREADS=$THREADS /usr/bin/time -f '%e %M' -a -o "$OUT/latent-generate-$d.txt" \
          ./target/release/latent generate "$PROMPT" "${COMMON[@]}" --dtype "$d" --seed 0 --quiet \
          --overwrite -o "$OUT/latent-$d.png" >/dev/null; then :
      else note "latent generate $d failed (exit $?)"; : >"$OUT/latent-generate-$d.txt"; break; fi
    done
  done
fi
if [ -z "${SKIP_DIFFUSERS:-}" ]; then
  for d in $DIFFUSERS_DTYPES; do
    note "diffusers $d: load average $(load)"
    if "$PYTHON" tools/bench_diffusers.py "$TURBO_DIR" --vae "$TAESD_DIR" --prompt "$PROMPT" --width "$SIZE" \
        --height "$SIZE" --steps "$STEPS" --guidance "$GUIDANCE" --scheduler "$SCHEDULER" \
        --threads "$THREADS" --dtype "$d" --repeat "$REPEAT" --save "$OUT/diffusers-$d.png" \
        >"$OUT/diffusers-$d.json"; then :
    else note "diffusers $d failed (exit $?)"; rm -f "$OUT/diffusers-$d.json"; fi
  done
fi
note "records and images in $OUT"

"$PYTHON" - "$OUT" "$DTYPES" "$DIFFUSERS_DTYPES" "$THREADS" <<'PY'
import json, statistics, sys
from pathlib import Path
out, ours, theirs, threads = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
def rec(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None
def gen(d):
    p = out / f"latent-generate-{d}.txt"
    rows = [l.split() for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
    rows = [r for r in rows if len(r) == 2]
    if not rows:
        return None
    return statistics.median(float(r[0]) for r in rows), max(int(r[1]) for r in rows) * 1024
match = {"f32": "fp32", "bf16": "bf16", "f16": "fp32"}
cols, used = [], set()
for d in ours:
    t = match.get(d, "fp32") if match.get(d, "fp32") in theirs else None
    used.add(t)
    cols.append((d, t))
cols += [(None, t) for t in theirs if t not in used]
def latent_vals(d):
    r, g = rec(f"latent-{d}"), gen(d)
    v = {}
    if r:
        v = {k: r.get(k) for k in ("load_s", "text_encode_s", "step_s_median", "decode_s")}
        v["warm"] = v["first"] = r["text_encode_s"] + sum(r["step_s_all"]) + r["decode_s"]
        v["rss"] = r["peak_rss_bytes"] / 1e9
    if g:
        v["cold"], v["cold_rss"] = g[0], g[1] / 1e9
    return v
def diffusers_vals(t):
    r = rec(f"diffusers-{t}")
    if not r:
        return {}
    v = {k: r[k] for k in ("load_s", "text_encode_s", "step_s_median", "decode_s")}
    rss = r["peak_rss_bytes"] / 1e9
    v.update(warm=r["total_s"], first=r["total_s_all"][0], cold=r["cold_s"], rss=rss, cold_rss=rss)
    return v
print(f"SD-Turbo random weights + tiny VAE, {threads} threads; see the JSON records for settings")
for _, t in cols:
    r = rec(f"diffusers-{t}") if t else None
    if r:
        print(f"diffusers {t}: {r['tool']}, {r['pipeline']} + {r['vae']}, {r['scheduler']}, "
              f"{r['width']}x{r['height']}, {r['steps']} step(s), guidance {r['guidance']}; "
              f"load average {r['loadavg_1m_start']:.2f} -> {r['loadavg_1m_end']:.2f}; "
              f"CPU s per image {r['total_cpu_s']:.2f}")
rows = [("warm", "s/image, loaded"), ("first", "  1st after load"), ("cold", "s/image, cold"),
        ("load_s", "load s"), ("text_encode_s", "text s"), ("step_s_median", "UNet step s"), ("decode_s", "decode s"),
        ("rss", "peak RSS GB"), ("cold_rss", "peak RSS GB, cold")]
head = f"{'':<18}"
for d, t in cols:
    head += (f"{'latent ' + d:>13}" if d else "") + (f"{'diffusers ' + t:>16}" if t else "") + \
            (f"{'ratio':>7}" if d and t else "")
print(head)
vals = [(latent_vals(d) if d else None, diffusers_vals(t) if t else None) for d, t in cols]
for k, label in rows:
    line = f"{label:<18}"
    for (d, t), (lv, dv) in zip(cols, vals):
        x = lv.get(k) if lv is not None else None
        y = dv.get(k) if dv is not None else None
        if d:
            line += f"{x:>13.3f}" if x is not None else f"{'-':>13}"
        if t:
            line += f"{y:>16.3f}" if y is not None else f"{'-':>16}"
        if d and t:
            line += f"{x / y:>7.2f}" if x is not None and y else f"{'-':>7}"
    print(line)
print("loaded: latent bench --resident text+steps+decode (one image, the first after load); diffusers")
print("  pipeline call, median of images 2..N (1st after load: its first image). Stage rows: diffusers'")
print("  medians over images 2..N.")
print("cold: latent generate process wall time (median); diffusers process start to first image.")
print("peak RSS: latent bench / latent generate (max over runs); diffusers' process, both rows.")
PY
