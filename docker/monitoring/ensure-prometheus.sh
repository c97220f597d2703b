#!/usr/bin/env bash
# Installs Debian's Prometheus for the test that scrapes a real server with it, where this machine allows it (root
# and apt-get); elsewhere that test skips. Never fails the set-up.
command -v prometheus >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    install() { apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }
    install || { apt-get update -qq >/dev/null 2>&1 && install; } && exit 0
fi
echo "prometheus is not installed: the test that scrapes the server with it will skip"
