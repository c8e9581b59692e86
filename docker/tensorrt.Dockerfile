# syntax=docker/dockerfile:1
# The TensorRT worker: NVIDIA's TensorRT container (TensorRT, CUDA, cuDNN) plus trtforge[gpu,postgres]
# installed by scripts/install-locked.sh, the install step CI runs, at the versions
# requirements-lock.txt pins. Build from the repository root, naming the container release and
# the TensorRT version it ships (NVIDIA's container release notes list the pairs):
#   docker build -f docker/tensorrt.Dockerfile \
#     --build-arg TENSORRT_TAG=25.08-py3 --build-arg TENSORRT_VERSION=10.13 -t trtforge-worker-trt .
# The build fails when the container's TensorRT is not TENSORRT_VERSION, so an image's label
# always says which TensorRT its engines are for. At start the worker discovers its target:
# tensorrt <that version> on the first GPU it sees (name, compute capability), and registers it;
# TRTFORGE_WORKER_TARGETS overrides discovery. Needs a 25.01 or newer release (Ubuntu 24.04,
# Python 3.12; trtforge needs 3.11+) and a driver that release supports; run with a GPU
# (compose: deploy.resources.reservations.devices; docker run --gpus 1).
ARG TENSORRT_TAG=25.08-py3
FROM nvcr.io/nvidia/tensorrt:${TENSORRT_TAG}
ARG TENSORRT_TAG
ARG TENSORRT_VERSION=10.13
LABEL org.opencontainers.image.title="trtforge TensorRT worker" \
      io.trtforge.tensorrt-container="${TENSORRT_TAG}" \
      io.trtforge.tensorrt-version="${TENSORRT_VERSION}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The distribution's venv module, at whatever version the release's Ubuntu carries.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# --system-site-packages: the container's own tensorrt package stays importable; every other
# dependency is installed into the venv at its locked version.
RUN python3 -m venv --system-site-packages /opt/trtforge
ENV PATH=/opt/trtforge/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md requirements-lock.txt ./
COPY scripts/install-locked.sh scripts/
COPY core core
COPY calibrators calibrators
COPY engines engines
COPY service service
RUN bash scripts/install-locked.sh gpu,postgres \
 && trtforge --help >/dev/null \
 && python -c 'import sys, tensorrt; v = tensorrt.__version__; want = sys.argv[1]; \
sys.exit(0 if v == want or v.startswith(want + ".") else \
f"this container has TensorRT {v}, not {want}: set --build-arg TENSORRT_VERSION={v}")' \
    "${TENSORRT_VERSION}"

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/trtforge trtforge \
 && install -d -o trtforge -g trtforge -m 0700 /data
ENV PYTHONUNBUFFERED=1 \
    TRTFORGE_DATA_DIR=/data
USER 10001:10001
# TensorRT's timing caches live under ~/.cache/trtforge (mount a volume there to keep them).
WORKDIR /home/trtforge
VOLUME ["/data"]
CMD ["trtforge", "worker"]
