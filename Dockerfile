# The palstream image: the job runner, the Dask scheduler and the workers (CPU and GPU) of
# the Helm chart (helm/palstream) all run it. GPU nodes need only the NVIDIA driver; the CUDA
# libraries of torch and dask-cuda come with their wheels, the base adds the CUDA runtime.
#
#   docker build -t ghcr.io/palstream/palstream:0.1.0 .
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/palstream \
    PATH=/opt/palstream/bin:$PATH

# Ubuntu 24.04's Python is 3.12 (the project supports >= 3.11); no ffmpeg package is needed:
# PyAV and imageio-ffmpeg bring their own.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

COPY pyproject.toml README.md /src/
COPY palstream /src/palstream
RUN pip install "/src[gpu]" && rm -rf /src

# The codec's numba kernels, compiled into the image so that a pod encodes within seconds,
# not after minutes of compiling. NUMBA_CPU_NAME=generic builds (and keys the cache) for any
# CPU of the architecture, not the build machine's model: a cluster mixes CPU generations.
# The chart's root filesystem is read-only: palstream copies this cache to /tmp at first use.
ENV NUMBA_CACHE_DIR=/opt/palstream/numba-cache \
    NUMBA_CPU_NAME=generic
RUN python -m palstream.codec && chmod -R a+rX "$NUMBA_CACHE_DIR"

# Non-root, matching the chart's runAsUser; HOME is the writable /tmp scratch volume
# because the chart mounts the root filesystem read-only.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp palstream
USER 10001
ENV HOME=/tmp
WORKDIR /tmp
CMD ["palstream", "--help"]
