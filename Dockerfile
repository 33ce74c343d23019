# Strata's server image, for CPUs or NVIDIA GPUs:
#
#   docker build -t strata:cpu .
#   docker build --build-arg VARIANT=cuda -t strata:cuda .
#   docker run -p 8000:8000 -v /path/to/checkpoint:/models/model:ro strata:cpu
#
# The image holds no model: it serves the checkpoint directory (or GGUF file) mounted at /models/model
# (STRATA_MODEL), and with nothing mounted there it exits at once, saying what to mount. A Hugging Face id
# works too where the container may download it (-e STRATA_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct, with
# a volume at /var/cache/strata/hf and -e HF_HOME=/var/cache/strata/hf to keep what it fetched).
#
# Every `strata serve` flag is also an environment variable (`--max-queue` is STRATA_MAX_QUEUE),
# so `docker run -e STRATA_DEVICES=cuda:0,cuda:1 ...` and extra arguments after the image name
# (`... strata:cuda --devices cuda:0,cuda:1`) both work. Stages are processes in the same container.
#
# Unused per-variant stages are skipped by BuildKit (the default builder since Docker 23).

ARG VARIANT=cpu

# ---- Python, per variant: the base of both the build and the runtime image -----------------------

FROM python:3.11-slim AS python-cpu

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS python-cuda
# The distribution's Python (3.12 on Ubuntu 24.04). Its version is not pinned: the base image's tag
# fixes the release, and an exact pin breaks the build as soon as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
# A GPU image serves on the first GPU unless told otherwise.
ENV STRATA_DEVICES=cuda:0

# ---- torch in a virtual environment, per variant (the slowest layer, cached apart from the code) --

FROM python-cpu AS torch-cpu
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
      --index-url https://download.pytorch.org/whl/cpu

FROM python-cuda AS torch-cuda
ARG TORCH_VERSION=2.13.0
# The wheel index of the CUDA build; its CUDA libraries come with the wheel, the base image brings the
# NVIDIA container runtime's settings. The driver on the host must support this CUDA version.
ARG TORCH_CUDA=cu128
# Unpinned for the reason given in python-cuda.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
      --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

# ---- the project, installed into that environment ---------------------------------------------------

# Not an image from a registry but one of the stages above, picked by VARIANT; the linter cannot tell.
# hadolint ignore=DL3006
FROM torch-${VARIANT} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY batching/ batching/
COPY engine/ engine/
COPY gateway/ gateway/
COPY tokenization/ tokenization/
COPY loadtest/ loadtest/
# A C compiler for the engine's CPU kernels, built here into the installed package: the runtime image
# has none. Unpinned for the reason given in python-cuda.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# torch is already there and satisfies the project's requirement, so pip keeps the build chosen above.
# -P: the kernels go into the installed package, not into the sources in this directory.
RUN /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/python -P -m engine.kernels.build

# ---- runtime: the base plus the environment, no compilers, no sources -----------------------------

# Again a stage above, not a registry image.
# hadolint ignore=DL3006
FROM python-${VARIANT} AS runtime
# A fixed numeric id (not 1000, which Ubuntu's base image already uses), so that Kubernetes'
# runAsNonRoot can check it and mounted volumes can be owned by it.
RUN groupadd --gid 10001 strata \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/strata --shell /usr/sbin/nologin strata \
 && mkdir -p /models /var/cache/strata \
 && chown strata:strata /var/cache/strata
COPY --from=build /opt/venv /opt/venv
# STRATA_CACHE holds the device probe's results (and the demo model, if no checkpoint is mounted).
# The checkpoint directory is mounted at /models/model.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STRATA_CACHE=/var/cache/strata \
    STRATA_MODEL=/models/model \
    STRATA_HOST=0.0.0.0 \
    STRATA_PORT=8000
WORKDIR /home/strata
USER 10001:10001
EXPOSE 8000
# Loading a large checkpoint takes minutes, hence the long start period; /health answers 503 while the
# server drains or after a stage died, and urlopen raises on any status but 2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('STRATA_PORT', '8000'), timeout=4)"]
# SIGTERM drains open streams for up to STRATA_DRAIN_TIMEOUT (30 s) before exiting 0: give `docker stop`
# a longer --time (its default is 10 s).
ENTRYPOINT ["strata", "serve"]
