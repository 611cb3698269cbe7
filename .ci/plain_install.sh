#!/usr/bin/env bash
# A plain install (no extras: no torch, no Dask) must decode and verify an archive.
# Usage: .ci/plain_install.sh   (from the repository root, with the test venv active: it encodes)
set -euo pipefail
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
palstream -q encode tests/data/screen_37x29.mkv "$scratch/a.zarr" --lossless --gop 2
palstream -q decode "$scratch/a.zarr" "$scratch/full.y4m"

python3 -m venv "$scratch/plain"
# Editable, so the plain venv finds the kernels the test venv compiled for these same source files
# (numba's cache is keyed by source path): the dependency set is what a plain `pip install .` gets.
"$scratch/plain/bin/pip" install -q -e .
if "$scratch/plain/bin/python" -c "import torch" 2>/dev/null; then
    echo "plain install: torch is installed, so this proves nothing"; exit 1
fi
"$scratch/plain/bin/palstream" verify "$scratch/a.zarr"
"$scratch/plain/bin/palstream" decode "$scratch/a.zarr" "$scratch/plain.y4m"
cmp "$scratch/full.y4m" "$scratch/plain.y4m"
echo "plain install: decode and verify without torch, output identical"
