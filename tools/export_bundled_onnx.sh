#!/usr/bin/env bash
# Re-exports the bundled models' ONNX graphs and the ONNX test fixtures.
# Needs Python 3 with onnx and numpy:  python3 -m venv .venv && .venv/bin/pip install onnx==1.23.2 numpy==2.4.6
# Not needed to build or test darkwatch: the outputs are committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" tools/export_onnx.py models/smd-machine-1-6
"$PY" tools/export_onnx.py models/smd-machine-1-6-mse
mkdir -p tests/data/onnx
"$PY" tools/export_onnx.py models/smd-machine-1-6 --layout stacked --out tests/data/onnx/pae-stacked.onnx
"$PY" tools/export_onnx.py models/smd-machine-1-6 --variance log_variance --out tests/data/onnx/pae-log-variance.onnx
"$PY" tools/export_onnx.py models/smd-machine-1-6 --batch 1 --out tests/data/onnx/pae-fixed-batch.onnx
# An ensemble of two PAEs, trained with (no MSS bank, to keep it small):
#   printf '[model]\nmembers = 2\n[mss]\nbank_frames = 0\n[train]\nepochs_max = 20\n' > ens.toml
#   darkwatch train --input tests/data/smd/machine-1-6_train.npy --out tests/data/onnx/ensemble --config ens.toml --force
"$PY" tools/export_onnx.py tests/data/onnx/ensemble
