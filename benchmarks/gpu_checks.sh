#!/usr/bin/env bash
# GPU checks and GPU benchmarks, run once on a host with an NVIDIA GPU (issues 3 and 4).
#
#   bash benchmarks/gpu_checks.sh CLIPS_DIR OUT_DIR
#
# CLIPS_DIR holds the corpus clips the palette benchmark samples (screen_gnome, animation2d,
# camera_rocket). Where palstream is not pip-installed (a bare GPU host with only wheels), set
# PYTHONPATH to the wheels' folder and this checkout. Every step logs to OUT_DIR and runs under
# its own time limit, so one failing step does not hide the others.
set -u
clips=${1:?usage: gpu_checks.sh CLIPS_DIR OUT_DIR}
out=${2:?usage: gpu_checks.sh CLIPS_DIR OUT_DIR}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  tail -n 25 "$out/$name.log"
}

step environment 60 bash -c "nvidia-smi -L; $py -c 'import torch, numba, dask, distributed, dask_cuda, zarr, av; print(torch.__version__, torch.cuda.get_device_name(), numba.__version__, dask.__version__, dask_cuda.__version__)'"
# The real-GPU test of the cuda cluster (a LocalCUDACluster job), and the mocked-GPU tests beside it.
step gpu_tests 300 "$py" -m pytest -q -p no:cacheprovider tests/test_batch.py -k "cuda" -rs
# Palette generation on the GPU: cgan-v1 against k-means(10), same blocks, same device, batched.
step palettes_cuda 300 "$py" benchmarks/palette_quality.py --corpus "$clips" --device cuda --frames 4 --repeat 3 \
  --no-cnn-features --codec-frames 16 --out "$out/palette_quality_cuda.json"
