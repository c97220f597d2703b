"""TLS on both protocols, with a certificate the test makes for 127.0.0.1."""
from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from rewardserve.trainer.client import RewardClient, UntrustedServer

from ..conftest import ServerProcess


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(folder / "key.pem"),
                    "-out", str(folder / "cert.pem")], check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


def test_https_and_grpcs_with_the_server_certificate(tiny_llama, certificate):
    cert, key = certificate
    server = ServerProcess(tiny_llama, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        item = [{"prompt": "Hi", "response": "Hello"}]
        idle = RewardClient(server.http_url, ca_file=str(cert))  # a trainer's keep-alive connection, left open
        https = idle.score(item).scores
        with RewardClient(server.grpc_url, ca_file=str(cert)) as client:
            grpcs = client.score(item).scores
        assert server.http_url.startswith("https://") and https == pytest.approx(grpcs, abs=1e-5)
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is not trusted
            httpx.post(f"{server.http_url}/score", json={"items": item})
        for url in (server.http_url, server.grpc_url):  # a configuration error: said at once, never retried
            began = time.perf_counter()
            with RewardClient(url, timeout=5) as client, pytest.raises(UntrustedServer,
                                                                      match="not trusted .*--reward-ca-file"):
                client.score(item)
            assert time.perf_counter() - began < 3  # the 8 attempts of an outage take ~18 s
    finally:
        stopped = time.perf_counter()
        # An idle keep-alive HTTPS connection used to hold a SIGTERM for 30 s (asyncio waits that long for the
        # client's TLS close_notify): Kubernetes would kill the pod before it exited
        assert server.stop() == 0 and time.perf_counter() - stopped < 20
        idle.close()
