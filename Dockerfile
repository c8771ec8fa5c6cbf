# chargen images, built from one Dockerfile:
#   docker build -t chargen .                                  # the service (default, last stage: runtime)
#   docker build -t chargen-train --target train .             # the batch training job, CUDA build of torch
#   docker build -t chargen-train-cpu --target train-cpu .     # the same job on CPU torch (no GPU needed)
# docker-compose.yml builds them. See docs/deployment.md.
#
# Stages: wheel (builds the project's wheel once) -> runtime-venv / train-venv (a virtualenv with the
# CPU or CUDA torch plus the wheel) -> train / runtime (slim images holding only the virtualenv, the
# files they need and a non-root user). Compilers, pip caches, sources and the package index
# settings stay in the build stages.
#
# No `# syntax=` line: BuildKit's built-in Dockerfile frontend (Docker 20.10 and later) has every
# feature used here, and a syntax line makes each build fetch the frontend image from Docker Hub,
# which fails behind a registry mirror that does not carry it, or offline.

# Pinned tags; pin digests too (`docker buildx imagetools inspect python:3.11.13-slim-bookworm`) when
# builds must be bit-for-bit repeatable. Behind a mirror: --build-arg PYTHON_IMAGE=mirror/python:...
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1


# --- build: the package index every pip in the build stages reads (a mirror's, via --build-arg) ---
# Only build stages derive from this one: the final images start again from `base`, so the index URL
# (which may carry a mirror's credentials) is in no image's environment or history.
FROM base AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_INDEX_URL=${PIP_INDEX_URL}


# --- wheel: the chargen distribution (training + service packages), built once for both images ---
FROM build AS wheel
WORKDIR /src
# README.md is the distribution's long description (pyproject `readme`), so the build needs it.
COPY pyproject.toml README.md ./
COPY chargen ./chargen
COPY training ./training
COPY service ./service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .


# --- runtime-venv: CPU-only torch from the PyTorch CPU index (no CUDA libraries: ~5x smaller) ---
FROM build AS runtime-venv
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: it is the big, slow download and changes far less than the code.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX_URL}"
COPY --from=wheel /wheels /wheels
# The installed torch (2.13.0+cpu) satisfies the project's `torch>=2.4,<2.15`, so pip keeps it and
# takes only the remaining dependencies from the index. Non-editable: the image needs no source
# tree. Without extras: the trainer's plotting and progress-bar packages stay out of the api image.
RUN pip install --no-cache-dir /wheels/chargen-*.whl


# --- train-cpu-venv: the same virtualenv plus the `train` extra (matplotlib, tqdm) ---
FROM runtime-venv AS train-cpu-venv
# Not a package to pin (DL3013): the wheel file built above, with its extra.
# hadolint ignore=DL3013
RUN set -- /wheels/chargen-*.whl && pip install --no-cache-dir "$1[train]"


# --- train-venv: the default PyPI torch wheel, which is the CUDA build on linux/x86_64 ---
FROM build AS train-venv
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA_INDEX_URL=https://pypi.org/simple
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CUDA runtime, cuDNN and NCCL come as nvidia-* wheels with torch; the host supplies only the
# driver (NVIDIA Container Toolkit), so no nvidia/cuda base image is needed.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_CUDA_INDEX_URL}"
COPY --from=wheel /wheels /wheels
# Not a package to pin (DL3013): the wheel file built above, with its extra.
# hadolint ignore=DL3013
RUN set -- /wheels/chargen-*.whl && pip install --no-cache-dir "$1[train]"


# --- job: what both training images share (docker compose --profile train run trainer) ---
FROM base AS job
# Same numeric uid as the runtime image, so both can share the models volume; USER is numeric so
# Kubernetes runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 chargen \
    && useradd --system --uid 10001 --gid chargen --create-home --home-dir /home/chargen chargen \
    && mkdir -p /data /runs /models \
    && chown chargen:chargen /data /runs /models
# Mount points owned by chargen: Docker seeds an empty named volume from the image's directory,
# ownership included, so the non-root job can write to fresh volumes. (No VOLUME instruction: a
# `docker run --rm` without -v would otherwise put checkpoints in an anonymous volume and drop them.)
WORKDIR /app
COPY configs ./configs
COPY --chmod=0755 deploy/train-job.sh /usr/local/bin/train-job
ENV PATH=/opt/venv/bin:$PATH \
    CHARGEN_CACHE=/data \
    CHARGEN_MODELS_DIR=/models \
    MPLBACKEND=Agg
USER 10001:10001
# train-job runs the command, forwards SIGTERM to it (checkpoint + exit 143 = rerun to resume) and,
# when training completes, publishes OUT/model.pt to /models/<run name>.pt for the api.
ENTRYPOINT ["train-job"]


# --- train: the training job on a GPU (CUDA torch) ---
FROM job AS train
COPY --from=train-venv /opt/venv /opt/venv
CMD ["chargen", "train", "--config", "configs/tinyshakespeare-gpu.toml", "--out", "/runs/shakespeare-gpu", "--resume"]


# --- train-cpu: the same job on CPU torch, for hosts without a GPU (deploy/train-cpu.yml) ---
FROM job AS train-cpu
COPY --from=train-cpu-venv /opt/venv /opt/venv
CMD ["chargen", "train", "--config", "configs/tinyshakespeare-cpu.toml", "--out", "/runs/shakespeare-cpu", "--resume"]


# --- runtime: the HTTP service (default target) ---
FROM base AS runtime
RUN groupadd --system --gid 10001 chargen \
    && useradd --system --uid 10001 --gid chargen --no-create-home --home-dir /nonexistent chargen \
    && mkdir -p /models \
    && chown chargen:chargen /models
COPY --from=runtime-venv /opt/venv /opt/venv
WORKDIR /app
COPY chargen/models/shakespeare.pt ./models/shakespeare.pt
# Settings are read from CHARGEN_* variables at start (see docs/deployment.md); these are the image's
# defaults, each overridable with `docker run -e` or compose `environment:`.
ENV PATH=/opt/venv/bin:$PATH \
    CHARGEN_MODEL=/app/models/shakespeare.pt \
    CHARGEN_PORT=8000
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz): slim has no curl, so python's urllib; urlopen raises on any non-2xx.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CHARGEN_PORT', '8000'), timeout=2)"]
CMD ["chargen", "serve", "--host", "0.0.0.0"]
