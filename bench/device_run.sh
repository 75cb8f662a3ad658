#!/usr/bin/env bash
# The GPU checks of issue #8 in one device call (WORKSPACE_NOTES.md "Performance" has the results).
# The device image has JAX/Flax/Optax/Orbax but not grain, array-record, gin-config, portpicker:
# their cp312 wheels travel in .whl/ (git-ignored; see the notes for the download command).
# Rows in priority order; each is cut at its own limit and at the call's budget (BUDGET seconds).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; BUDGET=${BUDGET:-520}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"
run() {  # run LIMIT_S CMD...: at most LIMIT_S and never past the budget
  local left=$((BUDGET - SECONDS)); local lim=$(( $1 < left ? $1 : left ))
  if [ "$lim" -le 20 ]; then echo "skip (budget): ${*:2}"; return; fi
  echo "+ [${SECONDS}s, limit ${lim}s] ${*:2}"
  timeout "$lim" "${@:2}" 2>&1 | grep -v "^W1\|^I1\|absl"
}
S=(python3 bench/step.py --configs cifar --cifar_batch 128 --calls 5 --rounds 3)
# Session 3 measured FIR conv vs separable (bench/results/step_h200_fir.json, with profiles):
#   "${S[@]}" --heads none --dtypes float32 --variant conv "FIR_IMPL='conv'" \
#     --variant separable "FIR_IMPL='separable'" --profile 2 --profile_dir /tmp/prof
# Next, in priority order: the f32 joint/ict ratio with the new default, then the utilisation
# candidates of WORKSPACE_NOTES.md (NHWC convolutions, batch 256), then steps_per_call = 4.
run 200 "${S[@]}" --heads none joint --dtypes float32 --profile 2 --profile_dir /tmp/prof \
  --out "$OUT/f32_heads.json"
for d in /tmp/prof/*/; do  # the Perfetto traces, for reading again off the machine
  cp "$(ls -t "$d"plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_$(basename "$d").json.gz"
done
XLA_FLAGS=--xla_gpu_force_conv_nhwc=true run 100 "${S[@]}" --heads none --dtypes float32 \
  --variant nhwc --out "$OUT/f32_nhwc.json"
run 100 python3 bench/step.py --configs cifar --cifar_batch 256 --calls 3 --rounds 3 --heads none \
  --dtypes float32 --variant b256 --out "$OUT/f32_b256.json"
run 120 "${S[@]}" --heads none --dtypes bfloat16 --steps_per_call 1 4 --calls 2 --out "$OUT/bf16_spc.json"
echo "done at ${SECONDS}s"
