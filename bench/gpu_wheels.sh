#!/usr/bin/env bash
# Wheels that bench/gpu.py needs on the lent GPU machine and its image lacks (or holds in another
# version): transformers 4.57 with its tokenizers / huggingface_hub, pydicom (the cold-TTFT CT is
# written as a DICOM series there: no SimpleITK) and bitsandbytes (8-bit / 4-bit rows), slimmed
# to its CUDA 13 and CPU libraries so that everything travels within the 64 MiB limit.
# Run once, here, in the repository root: bash bench/gpu_wheels.sh   ->  .whl/ (in .gitignore)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.0 pydicom==3.0.2 bitsandbytes==0.50.2
python3 - <<'PY'
import glob, zipfile, os
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
tmp = src + ".tmp"
keep = lambda n: not (n.endswith(".so") and "libbitsandbytes_" in n
                      and not any(k in n for k in ("cuda130", "cuda132", "cpu")))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not keep(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith("/RECORD"):   # drop the removed libraries from the record too
            data = b"\n".join(l for l in data.split(b"\n") if keep(l.split(b",")[0].decode()))
        zout.writestr(item, data)
os.replace(tmp, src)
PY
du -ch .whl/*.whl | tail -1
