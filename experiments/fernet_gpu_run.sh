#!/usr/bin/env bash
# One device run: the fifth model's ablation, CPU-budget candidates and GPU recipe, all at
# once on one GPU with the JAX backend (each process is far too small to fill an H100/H200).
#   bash experiments/fernet_gpu_run.sh OUT_DIR [SECONDS_PER_PROCESS] [extra train args...]
# Results: OUT_DIR/results.jsonl (one line per epoch and per finished run), OUT_DIR/all.log.
# VARIANTS="full e45" runs only the named ones. Run from the project root; needs
# benchmarks/fernet_gpu.py pack's files in .gpu/ and keras on the path.
# Training is the package's `train_model` (no MLflow), so the dtype policy is train.precision
# (auto: mixed_float16 on a GPU); the 2026-11-28 H200 ablation (fernet_gpu_ablation_h200.jsonl)
# ran in mixed_bfloat16 (pass -S train.precision=mixed_bfloat16 to compare).
set -u
out=${1:?OUT_DIR}; limit=${2:-480}; shift 2 || shift $#
# The package from this checkout (the lent machine has no editable install).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
log=$out/results.jsonl
f=models.fernet
off_aug="-S $f.augmentation.rotation=0 -S $f.augmentation.width_shift=0 -S $f.augmentation.height_shift=0 -S $f.augmentation.zoom=0 -S $f.augmentation.horizontal_flip=false -S $f.augmentation.random_erasing=0"
run() {
  local name=$1; shift
  [[ -z "${VARIANTS:-}" || " $VARIANTS " == *" $name "* ]] || return 0   # VARIANTS="a b": only those
  ( timeout "$limit" python3 benchmarks/fernet_gpu.py train --name "$name" --log "$log" "$@" 2>&1 \
      | sed -u "s/^/[$name] /" >> "$out/all.log" ) &
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
# The GPU recipe (profile), test read for the report only.
run gpu_recipe --profile fernet-gpu --test "$@"
# Ablation of the CPU-budget recipe (params.yaml's models.fernet, 30 epochs): one idea off each.
run full "$@"
run no_label_smoothing -S $f.label_smoothing=0 "$@"
run no_random_erasing -S $f.augmentation.random_erasing=0 "$@"
run no_augmentation $off_aug "$@"
run study_optimizer -S $f.optimizer=adam -S $f.lr_schedule=plateau -S $f.learning_rate=0.001 -S $f.weight_decay=0 "$@"
# Candidates for the CPU budget (about 45 width-1 epochs of CPU time each), chosen on val.
run e45 -S $f.epochs=45 "$@"
run e45_erasing25 -S $f.epochs=45 -S $f.augmentation.random_erasing=0.25 "$@"
run w125_e30 -S $f.width=1.25 "$@"
wait
python3 benchmarks/fernet_gpu.py table "$log" | tee "$out/table.md"
