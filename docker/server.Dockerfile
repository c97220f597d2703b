# The reward server. Build from the repository root:
#   docker build -f docker/server.Dockerfile -t rewardserve-server .
# BASE_IMAGE: python:3.11-slim by default; any image with Python 3.10+ and python3-venv works.
# TORCH_SPEC / TORCH_INDEX_URL: what pip installs for torch. The default, `torch` from PyPI, is the CUDA build on
# Linux: its wheels carry the CUDA libraries, so on an NVIDIA host (with the NVIDIA container toolkit) the slim base
# is enough. docker/compose.cpu.yml switches to PyTorch's CPU index (a much smaller image). A wheel file placed in
# docker/wheels/ can be named as /wheels/<file> (docker/smoke.sh does this where no index but PyPI is reachable).
# Layers: torch, then the dependencies (from a skeleton of the package), then the code, so a code change rebuilds
# only the last, small layer.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch"
ARG TORCH_INDEX_URL=https://pypi.org/simple
# The lines down to the torch install are the same in both Dockerfiles, so the two images share those layers.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1
# A C and C++ compiler, and Python's headers: Triton builds flex_attention's and the compiled decode step's kernels
# (and its launcher, which includes Python.h) with them, inductor its CPU kernels. The slim base has none, and
# without them every compiled kernel would fall back at start. docker/smoke.sh compiles a kernel in each image.
RUN apt-get update && apt-get install -y --no-install-recommends g++ libc6-dev \
    && (python3 -c "import os, sys, sysconfig; sys.exit(not os.path.isfile(sysconfig.get_paths()['include'] + '/Python.h'))" \
        || apt-get install -y --no-install-recommends python3-dev) \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv && useradd --create-home --uid 10001 rewardserve

# Layer 1, rarely rebuilt: torch and the dependencies, installed from a skeleton of the package.
COPY docker/wheels/ /wheels/
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY pyproject.toml README.md /src/
RUN mkdir -p /src/server /src/proto /src/trainer/bench /src/trainer/client /src/trainer/integrations \
        /src/trainer/rl /src/trainer/rm \
    && touch /src/server/__init__.py /src/proto/__init__.py /src/trainer/__init__.py /src/trainer/bench/__init__.py \
        /src/trainer/client/__init__.py /src/trainer/integrations/__init__.py /src/trainer/rl/__init__.py \
        /src/trainer/rm/__init__.py \
    && pip install /src && pip uninstall -y rewardserve

# Layer 2, rebuilt on every code change: the project itself.
COPY server /src/server
COPY trainer /src/trainer
COPY proto /src/proto
RUN pip install --no-deps /src && rm -rf /src /wheels

ENV REWARDSERVE_HOST=0.0.0.0
USER rewardserve
WORKDIR /home/rewardserve
EXPOSE 8000 50051
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:' + __import__('os').environ.get('REWARDSERVE_HTTP_PORT', '8000') + '/ready', timeout=2)"
ENTRYPOINT ["rewardserve", "serve"]
