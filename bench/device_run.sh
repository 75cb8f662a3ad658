#!/usr/bin/env bash
# Issue #16's GPU measurements in one device call of at most 8 minutes (BUDGET seconds):
#   1. bf16 ict and joint at per-device batches 128, 256, 512: MFU against the datasheet peak,
#      joint/ict time against the FLOP ratio (target <= 1.331), the cost projection;
#   2. the fused optimizer against optax leaf by leaf (joint, bf16, batch 128);
#   3. attention through jax.nn.dot_product_attention (xla, cudnn) against the einsums;
#   4. a profile of the joint bf16 step (trace kept).
# Rows in priority order; each command is cut at its own limit and at the budget. Results go to
# $OUT (bench/results/ once fetched); docs/performance.md says how to read them.
# The device image has JAX/Flax/Optax/Orbax but not grain, array-record, gin-config, portpicker;
# their cp312 wheels travel in .whl/ (git-ignored), made here with
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --no-deps -d .whl grain array-record gin-config portpicker etils
# and carried with the run tool's `carry: [".whl"]`.
# DRY=1 parses every timed row's gin bindings on this machine's CPU instead (tests/test_costs.py).
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; BUDGET=${BUDGET:-470}; DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
  EXTRA=(--dry_run)
else
  EXTRA=()
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"
run() {  # run LIMIT_S CMD...: at most LIMIT_S and never past the budget
  local left=$((BUDGET - SECONDS)); local lim=$(( $1 < left ? $1 : left ))
  if [ "$lim" -le 20 ]; then echo "skip (budget): ${*:2}"; return; fi
  echo "+ [${SECONDS}s, limit ${lim}s] ${*:2}"
  timeout "$lim" "${@:2}" "${EXTRA[@]}" 2>&1 | grep -v "^W1\|^I1\|absl"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "exit $rc: ${*:2}"; echo 1 >>"$OUT/.failed"; fi
}
rm -f "$OUT/.failed"
S=(python3 bench/step.py --configs cifar --dtypes bfloat16 --calls 5 --rounds 3)
B=(--per_device_batch 128 256 512)
OPT=(--variant fused "make_optimizer.impl='fused'" --variant optax "make_optimizer.impl='optax'")
ATT=(--variant einsum "ATTN_IMPL='einsum'" --variant xla "ATTN_IMPL='xla'" \
  --variant cudnn "ATTN_IMPL='cudnn'")
# Phase 1: the 9 distinct programs compiled by 4 processes at once into a persistent cache (a
# CIFAR step compiles in 40-80 s on the H200 host, one at a time), so the timed rows load them.
export JAX_COMPILATION_CACHE_DIR=/tmp/jcdm-jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
if [ "$DRY" != 1 ]; then
  C=("${S[@]}" --compile_only --per_device_batch 128)
  XLA_PYTHON_CLIENT_PREALLOCATE=false run 200 "${S[@]}" --compile_only --heads none "${B[@]}" &
  XLA_PYTHON_CLIENT_PREALLOCATE=false run 200 "${S[@]}" --compile_only --heads joint "${B[@]}" &
  XLA_PYTHON_CLIENT_PREALLOCATE=false run 200 "${C[@]}" --heads joint "${OPT[@]}" &
  XLA_PYTHON_CLIENT_PREALLOCATE=false run 200 "${C[@]}" --heads joint "${ATT[@]}" &
  wait
fi
# Phase 2: the timed rows, one process at a time, in priority order.
run 150 "${S[@]}" --heads none joint "${B[@]}" --out "$OUT/step_bf16_batches.json"
run 60 "${S[@]}" --heads joint --per_device_batch 128 "${OPT[@]}" --out "$OUT/step_bf16_optimizer.json"
run 70 "${S[@]}" --heads joint --per_device_batch 128 "${ATT[@]}" --out "$OUT/step_bf16_attention.json"
run 50 "${S[@]}" --heads joint --per_device_batch 128 --calls 2 --profile 2 --profile_dir /tmp/prof \
  --out "$OUT/step_bf16_joint_profile.json"
for d in /tmp/prof/*/; do  # the Perfetto trace, for reading again off the machine
  [ -d "$d" ] && cp "$(ls -t "$d"plugins/profile/*/perfetto_trace.json.gz | head -1)" \
    "$OUT/trace_$(basename "$d").json.gz"
done
[ "$DRY" = 1 ] || python3 bench/cost.py "$OUT/step_bf16_batches.json" --at 0.5
echo "done at ${SECONDS}s"
if [ -f "$OUT/.failed" ]; then echo "$(wc -l <"$OUT/.failed") command(s) failed"; exit 1; fi
