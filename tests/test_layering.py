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


# -- the trainer's rooms --------------------------------------------------------------------------------------------
# The jobs (rl: the RL loop; rm: reward-model training and labelling), the reward client they share, the
# integrations for other trainers, what every job shares at the top (settings, metric sinks, prompts), and the tools
# that compose the jobs (cli, demo, compare, bench, the tools' settings, the old verl path kept for one release).
SHARED = {"settings", "tracking", "prompts", "arithmetic"}
TOOLS = {"cli", "demo", "compare", "best_of_n", "config", "bench", "verl_reward"}
MAY_IMPORT = {
    "shared": {"shared"},
    "client": {"client", "shared"},
    "integrations": {"integrations", "client"},
    "rl": {"rl", "client", "shared"},
    "rm": {"rm", "shared"},
}


def room_of(module: str) -> str:
    """`rl.ppo` -> rl; `prompts` -> shared; `cli` -> tools."""
    top = module.split(".")[0]
    if top in SHARED:
        return "shared"
    return "tools" if top in TOOLS else top


def trainer_imports(path: Path) -> set[str]:
    """The trainer modules a file imports, relative to rewardserve.trainer (`rl.ppo`, `client`, ...)."""
    package = list(path.relative_to(REPO / "trainer").parts[:-1])
    found = set()
    for name in imported_modules(path):
        if name.startswith("rewardserve.trainer."):
            found.add(name.removeprefix("rewardserve.trainer."))
        elif name.startswith("."):
            dots = len(name) - len(name.lstrip("."))
            base = package[: len(package) - (dots - 1)]
            found.add(".".join(base + [name.lstrip(".")]).strip("."))
    return {name for name in found if name}


def test_the_trainer_s_rooms_import_only_what_their_layer_allows():
    """rl and rm never import each other; the tools import the jobs, never the reverse; the client imports no job;
    the integrations reach only the client."""
    rooms = {"rl", "rm", "client", "integrations"}
    assert rooms <= {p.name for p in (REPO / "trainer").iterdir() if p.is_dir()}
    checked = 0
    for path in (REPO / "trainer").rglob("*.py"):
        module = ".".join(path.relative_to(REPO / "trainer").with_suffix("").parts)
        room = room_of(module)
        if room == "tools" or module == "__init__":
            continue
        for imported in trainer_imports(path):
            assert room_of(imported) in MAY_IMPORT[room], f"{path.relative_to(REPO)} ({room}) imports {imported}"
        checked += 1
    assert checked > 25


def test_the_tests_mirror_the_trainer_s_rooms():
    """Each room's tests sit in its own folder; at the top of tests/trainer only those of the tools and the shared
    modules."""
    for room in ("rl", "rm", "client"):
        assert list((REPO / "tests" / "trainer" / room).glob("test_*.py")), room
    top = {p.stem.removeprefix("test_") for p in (REPO / "tests" / "trainer").glob("test_*.py")}
    assert {room_of(name.split("_")[0]) for name in top} <= {"tools", "shared"}, top
