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
run 220 "${S[@]}" --heads none --dtypes float32 --variant conv "FIR_IMPL='conv'" \
  --variant separable "FIR_IMPL='separable'" --profile 2 --profile_dir /tmp/prof --out "$OUT/f32_fir.json"
for d in /tmp/prof/*/; do  # the Perfetto traces, for reading again off the machine
  cp "$(ls -t "$d"plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_$(basename "$d").json.gz"
done
BEST=$(python3 -c "
import json
rows = json.load(open('$OUT/f32_fir.json'))['steps']
print(min(rows, key=lambda r: r['step_s'])['variant'])" 2>/dev/null || echo conv)
echo "faster FIR impl: $BEST"
V=(--variant "$BEST" "FIR_IMPL='$BEST'")
run 170 "${S[@]}" --heads none joint --dtypes bfloat16 "${V[@]}" --out "$OUT/bf16_joint.json"
XLA_FLAGS=--xla_gpu_force_conv_nhwc=true run 90 "${S[@]}" --heads none --dtypes float32 \
  --variant "$BEST/nhwc" "FIR_IMPL='$BEST'" --out "$OUT/f32_nhwc.json"
run 90 python3 bench/step.py --configs cifar --cifar_batch 256 --calls 3 --rounds 3 --heads none \
  --dtypes float32 --variant "$BEST/b256" "FIR_IMPL='$BEST'" --out "$OUT/f32_b256.json"
echo "done at ${SECONDS}s"
