"""schemathesis against the server's own OpenAPI document: generated and mutated requests to every route, bounded
in count and time, and not one answered with a 5xx. The server keeps serving afterwards."""
from __future__ import annotations

import shutil
import sys
import subprocess
from pathlib import Path

import httpx
import pytest


@pytest.mark.slow  # 14 s; the default suite keeps test_hostile_inputs.py and test_bad_inputs.py
def test_no_generated_request_gets_a_server_error(running_server, tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("schemathesis is not installed")
    run = subprocess.run([cli, "run", f"{running_server.http_url}/openapi.json", "--checks", "not_a_server_error",
                          "--max-examples", "25", "--request-timeout", "20", "--seed", "1"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays out of the tree
    assert run.returncode == 0, run.stdout[-4000:]
    assert "passed" in run.stdout and "9/9" in run.stdout  # every route, /admin/reload included
    assert httpx.post(f"{running_server.http_url}/score", json={"items": [{"text": "ok"}]}).status_code == 200
