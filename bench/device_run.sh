#!/usr/bin/env bash
# The GPU checks of issue #8 in one device call (WORKSPACE_NOTES.md "Performance" has the results).
# The device image has JAX/Flax/Optax/Orbax but not grain, array-record, gin-config, portpicker:
# their cp312 wheels travel in .whl/ (git-ignored; see the notes for the download command).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print(jax.__version__, flax.__version__, optax.__version__, o.__version__)"
run() { echo "+ ${*:2}"; timeout "$1" "${@:2}" 2>&1 | grep -v "^W1\|^I1\|absl"; }
run 200 python3 bench/step.py --configs cifar --cifar_batch 128 --dtypes float32 \
  --calls 5 --rounds 3 --out "$OUT/step_cifar_f32.json"
run 150 python3 bench/step.py --configs cifar --cifar_batch 128 --dtypes bfloat16 \
  --calls 5 --rounds 3 --out "$OUT/step_cifar_bf16.json"
run 80 python3 bench/sample.py --config cifar --num 500 --random_inception --inception_batch 500 \
  --out "$OUT/sample.json"
run 90 python3 bench/step.py --configs cifar --cifar_batch 128 --dtypes bfloat16 \
  --steps_per_call 4 --heads none joint --calls 2 --rounds 3 --out "$OUT/step_spc4.json"
