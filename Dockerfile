# syntax=docker/dockerfile:1
# instructlm serving image.
#   CPU (default): ONNX Runtime, no torch.       docker build -t instructlm .
#   GPU: torch + triton + onnxruntime-gpu.       docker build -t instructlm-gpu --build-arg TARGET=gpu \
#                                                  --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 .
#   Bake a bundle in:                            --build-arg BUNDLE=runs/demo/bundle
#   or mount one at run time and point INSTRUCTLM_MODEL at it (the Helm chart's pvc / initContainer sources).
# Any base works that has python3 with venv, or apt-get to install them (Debian/Ubuntu); CI builds from a
# debootstrap'd bookworm (deploy/image-test.sh). docs/deploy.md has the sizes.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG TARGET=cpu

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Distribution packages follow the base image's release; pinning their versions would break on each point release.
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app

# The served graph's SlotAttention op (export/csrc/slot_attention.cc), compiled here so the runtime stage gets
# the library and no compiler. export/custom_ops.py is standard-library Python: it fetches onnxruntime's API
# headers (Debian's libonnxruntime-dev, SHA-256 checked) and runs g++.
FROM base AS ops
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY export/custom_ops.py /src/export/custom_ops.py
COPY export/csrc /src/export/csrc
RUN python3 /src/export/custom_ops.py build --out /opt/instructlm/libinstructlm_ops.so

# Dependencies and the package, into a venv that the runtime stage copies whole (no compilers, no pip cache).
FROM base AS build-common
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY instructlm instructlm
COPY model model
COPY kernels kernels
COPY export export
COPY service service
COPY training training
COPY configs configs

FROM build-common AS build-cpu
# A CA bundle for pip where TLS is intercepted (CI mounts the host's, see deploy/image-test.sh); empty: the base's.
ARG PIP_CA_BUNDLE=""
# `serve`: numpy, onnxruntime, tokenizers, litestar, gunicorn + uvicorn, prometheus-client. torch stays out
# (the ONNX path never imports it), which is most of the size difference.
# hadolint ignore=DL3042
RUN if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi \
    && /opt/venv/bin/pip install --upgrade "pip>=24" \
    && /opt/venv/bin/pip install ".[serve]" \
    && /opt/venv/bin/pip check \
    && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch in the CPU image" >&2; exit 1; fi

FROM build-common AS build-gpu
ARG PIP_CA_BUNDLE=""
# torch from PyPI carries its CUDA libraries; `train` too, so the same image runs the chart's torchrun Job.
# hadolint ignore=DL3042
RUN if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi \
    && /opt/venv/bin/pip install --upgrade "pip>=24" \
    && /opt/venv/bin/pip install ".[serve-gpu,gpu,train]" \
    && /opt/venv/bin/pip check

# A stage of this file, not an image to pull: hadolint cannot tell.
# hadolint ignore=DL3006
FROM build-${TARGET} AS build

# The bundle, made readable by the server user (exports are written 0700 by their atomic temporary directory).
FROM base AS bundle
# A directory from the build context; the default holds only a README, for images that mount their bundle.
ARG BUNDLE=deploy/empty-bundle
COPY ${BUNDLE} /models/bundle
RUN chmod -R a+rX,go-w /models

FROM base AS runtime
ARG TARGET=cpu
LABEL org.opencontainers.image.title="instructlm" \
      org.opencontainers.image.description="OpenAI-compatible serving of an instructlm model" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.instructlm.target="${TARGET}"
COPY --from=build /opt/venv /opt/venv
COPY --from=ops /opt/instructlm/libinstructlm_ops.so /opt/instructlm/libinstructlm_ops.so
# Training configs for the torchrun Job (relative paths resolve under /app; runs/ is a volume there), and the
# customer-service endpoint's default knowledge base and intent labels (service/tasks/settings.py, relative to
# /app); a deployment points `[tasks.customer_service]` at its own (the chart's server.settingsToml).
COPY configs /app/configs
COPY data/seed/faq.jsonl data/seed/intent_labels.jsonl /app/data/seed/
# Root-owned: read-only for the server user.
COPY --from=bundle /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    INSTRUCTLM_MODEL=/models/bundle \
    INSTRUCTLM_OPS_LIBRARY=/opt/instructlm/libinstructlm_ops.so \
    INSTRUCTLM_HOST=0.0.0.0 \
    INSTRUCTLM_PORT=8000
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# /health is 200 once the model is loaded and one forward has run; a 503 (loading, draining) raises here.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('INSTRUCTLM_PORT', '8000'), timeout=4)"]
# gunicorn (one uvicorn worker) configured from INSTRUCTLM_* (service/settings.py); graceful timeout = drain + 5 s.
ENTRYPOINT ["instructlm", "serve"]
