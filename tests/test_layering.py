"""The dependency rule: server never imports trainer; the core never loads fastapi or grpc."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_core_loads_no_protocol_library():
    code = ("import sys, rewardserve.server.service, rewardserve.server.batcher, rewardserve.server.tokenization;"
            "print(sorted(m for m in ('fastapi', 'grpc', 'starlette', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    return names


def test_server_never_imports_trainer():
    for path in (REPO / "server").glob("*.py"):
        assert not any("trainer" in name for name in imported_modules(path)), path


def test_adapters_reach_only_the_service_schemas_and_errors():
    # and admission: counting a request's items on its raw bytes, before it is parsed (pure functions, no model)
    allowed = {".service", ".schemas", ".errors", ".compat_api", ".admission"}
    for name in ("http_api.py", "grpc_api.py", "compat_api.py"):
        relative = {m for m in imported_modules(REPO / "server" / name) if m.startswith(".")}
        assert relative <= allowed, (name, relative - allowed)
        assert "torch" not in imported_modules(REPO / "server" / name)
