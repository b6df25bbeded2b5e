# syntax=docker/dockerfile:1
# selfreward images. Two targets:
#   cpu  the README demo on a CPU: the embedded Gemma 3 270M and the CPU torch build
#        docker build --target cpu -t selfreward:cpu .
#        docker run --rm -v "$PWD/runs:/data" selfreward:cpu iterate --recipe recipes/demo-cpu.yaml --output /data/runs/demo
#   gpu  a CUDA runtime with vLLM and DeepSpeed, for GPU nodes and clusters (SLURM, Kubernetes)
#        docker build --target gpu -t selfreward:gpu .
# /data is the volume for runs and the model cache (SELFREWARD_CACHE, HF_HOME); nothing secret is baked in:
# pass HF_TOKEN at run time if a gated hub model needs it.
ARG CPU_BASE=python:3.11-slim-bookworm
ARG GPU_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# What both targets install: the package, its recipes and seed data (copied once, used by both).
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY selfreward /src/selfreward
COPY recipes /src/recipes
COPY data /src/data

FROM ${CPU_BASE} AS cpu
# Where pip finds the CPU build of torch (PyPI's Linux wheels are CUDA builds); the same pin as the README.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    SELFREWARD_CACHE=/data/cache HF_HOME=/data/cache/huggingface PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 1000 selfreward && mkdir -p /data && chown selfreward /data
WORKDIR /opt/selfreward
COPY --from=source /src ./
# The project itself, at the releases CI tests (the constraints file), as the README's install does.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install -c selfreward/engine/constraints.txt --extra-index-url "${TORCH_INDEX}" torch==2.13.0 '.[embedded]'
USER 1000
VOLUME ["/data"]
ENTRYPOINT ["selfreward"]
CMD ["--help"]

FROM ${GPU_BASE} AS gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive \
    SELFREWARD_CACHE=/data/cache HF_HOME=/data/cache/huggingface PATH=/opt/venv/bin:$PATH
# The CUDA base image tracks its distribution's Python; pinning its Debian revisions would break on
# every base update, so the versions come with the base image tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1001 selfreward && mkdir -p /data && chown selfreward /data
WORKDIR /opt/selfreward
COPY --from=source /src ./
# vLLM brings the CUDA torch build it was made for; DeepSpeed for recipes/accelerate/zero3.yaml.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install '.[vllm,deepspeed]'
USER 1001
VOLUME ["/data"]
ENTRYPOINT ["selfreward"]
CMD ["--help"]
