#!/usr/bin/env bash
# latent batch as a Slurm job array: one array task per shard, all writing into one shared
# output folder. See deploy/README.md.
#
#   sbatch --array=0-3 deploy/slurm/batch-array.sh        # 4 shards
#   sbatch --dependency=afterany:JOBID --wrap "latent batch --merge $OUTPUT"   # then merge
#
# latent reads SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT itself
# (--shard auto), so any contiguous range works (--array=1-8 as well as 0-7). Resubmitting the
# same array resumes: each shard skips what is already recorded.
#
#SBATCH --job-name=latent-batch
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=latent-batch-%A_%a.log
set -euo pipefail

# Every setting has a default; override with `sbatch --export=ALL,PROMPTS=...`.
PROMPTS="${PROMPTS:-prompts.txt}"             # prompt file (.txt or .jsonl), on shared storage
OUTPUT="${OUTPUT:-outputs/$(basename "${PROMPTS%.*}")}"   # one folder for all shards
SEED="${SEED:-1234}"                          # run seed: must be the same for every shard
BATCH_SIZE="${BATCH_SIZE:-4}"                 # images per UNet call
LATENT="${LATENT:-latent}"                    # the binary
# LATENT_MODEL (exported by the caller) names the model; else pass --model in EXTRA.
EXTRA="${EXTRA:-}"

# shellcheck disable=SC2086 # EXTRA is a list of flags
exec "$LATENT" batch "$PROMPTS" \
  --shard auto \
  --seed "$SEED" \
  --output "$OUTPUT" \
  --batch-size "$BATCH_SIZE" \
  --quiet \
  $EXTRA
