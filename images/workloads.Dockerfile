# syntax=docker/dockerfile:1
# The workloads image: torch, torchvision, timm and the training, labeling and
# balancing entry points that TorchX jobs run (torchrun is on PATH).
#
#   docker build -f images/workloads.Dockerfile -t ghcr.io/noisy-student-operator/workloads:0.1.0 .
#
# CPU-only or another CUDA build: pass the matching wheel index, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY workloads/ workloads/
# torch and torchvision versions are pinned by the `workloads` extra.
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[workloads]" \
 && python -c "import torch, torchvision, timm, noisy_student_workloads" \
 && command -v torchrun

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 noisy \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/noisy \
      --shell /usr/sbin/nologin noisy
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/noisy
WORKDIR /home/noisy
USER 10001:10001
# No entrypoint: TorchX sets each role's command (torchrun / python -m ...).
