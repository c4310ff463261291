#!/usr/bin/env bash
# One device run (2026-12-04): the study's augmented CNN (params.yaml's custom_cnn_aug, exactly)
# beside robustness candidates of the fifth model at its full recipe, at once on one GPU with
# the JAX backend, through benchmarks/fernet_gpu.py (the package's train_model, no MLflow).
#   bash experiments/gpu_study_run.sh OUT_DIR [SECONDS_PER_PROCESS]
# Needs `python benchmarks/fernet_gpu.py pack` in .gpu/ (train and val) and keras on the path.
# Back in OUT_DIR: results.jsonl (epochs, finals with the val corruption suite), bundles of
# custom_cnn_aug and of the one fernet candidate `pick` chooses on validation (for
# `fernet_gpu.py import`), all.log while the lease's 8-file limit leaves room.
set -u
out=${1:?OUT_DIR}; limit=${2:-540}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
log=$out/results.jsonl; work=$(mktemp -d)
f=models.fernet
run() {
  local name=$1 lim=$2; shift 2
  ( timeout "$lim" python3 benchmarks/fernet_gpu.py train --name "$name" --log "$log" \
      --suite 2000 "$@" ${EXTRA:-} 2>&1 | sed -u "s/^/[$name] /" >> "$work/all.log" ) &
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
ls ~/.keras/models ~/.cache/torch/hub/checkpoints 2>&1 | head -5   # any ImageNet weights here?
run custom_cnn_aug "$limit" --model custom_cnn_aug --bundle "$out/bundle"
# fernet at params.yaml's recipe (standardize + noise 16) and rotation/blur levers on top of it
run f_base 420 --bundle "$work/bundle"
run f_rot20 420 -S $f.augmentation.rotation=20 --bundle "$work/bundle"
run f_rot15_blur05 420 -S $f.augmentation.rotation=15 -S $f.augmentation.blur=0.5 --bundle "$work/bundle"
run f_rot20_blur05 420 -S $f.augmentation.rotation=20 -S $f.augmentation.blur=0.5 --bundle "$work/bundle"
run f_rot25_blur05 420 -S $f.augmentation.rotation=25 -S $f.augmentation.blur=0.5 --bundle "$work/bundle"
while sleep 30; do   # progress: the newest epoch line of each run
  jobs -r | grep -q . || break
  python3 - "$log" <<'PY'
import json, sys
last = {}
for line in open(sys.argv[1]):
    r = json.loads(line); last[r["name"]] = r
print(" | ".join(f"{n} {r.get('epoch', r['event'])} {r.get('val_accuracy', '')}" for n, r in last.items()), flush=True)
PY
done
wait
python3 benchmarks/fernet_gpu.py table "$log"
pick=$(python3 benchmarks/fernet_gpu.py pick "$log" --prefix f_)
echo "picked: ${pick:-none}"
[ -n "$pick" ] && cp "$work/bundle/$pick".* "$out/bundle/"
n=$(find "$out" -type f | wc -l)
[ "$n" -lt 8 ] && xz -c "$work/all.log" > "$out/all.log.xz"
grep -E "Traceback|Error|error" "$work/all.log" | head -20
tail -c 3000 "$work/all.log"
