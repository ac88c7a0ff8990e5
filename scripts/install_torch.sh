#!/usr/bin/env bash
# Install torch into the given interpreter's environment without ever pulling a multi-GB
# CUDA build onto a machine that has no NVIDIA GPU.
#   GPU present (nvidia-smi lists one)   -> the default (CUDA) build from PyPI
#   no GPU, a local wheel is configured  -> that wheel (pip --no-index with the configured find-links)
#   no GPU otherwise                     -> the CPU-only build from the PyTorch CPU index
set -euo pipefail
PY=${1:?usage: install_torch.sh PYTHON}
VER=${TORCH_VERSION:-2.13.0}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$VER' else 1)" 2>/dev/null; then
  echo "torch $VER already installed"; exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing the CUDA build of torch $VER"
  "$PY" -m pip install -q "torch==$VER"
elif "$PY" -m pip install -q --no-index --no-deps "torch==$VER" 2>/dev/null; then
  # the local wheel alone first, then its dependencies from the package index
  "$PY" -m pip install -q "torch==$VER"
  echo "no GPU: installed torch $VER from a local wheel"
else
  echo "no GPU: installing the CPU-only build of torch $VER"
  "$PY" -m pip install -q "torch==$VER" --index-url "$CPU_INDEX"
fi
