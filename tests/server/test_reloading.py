"""The reload rules without a server: paths, one at a time, failures that leave the old model, the room check."""
from __future__ import annotations

import asyncio
import threading

import pytest

from rewardserve.server import main as server_main
from rewardserve.server.combinations import Combination
from rewardserve.server.config import ServeConfig
from rewardserve.server.errors import Conflict, Forbidden, InsufficientMemory, ReloadFailed
from rewardserve.server.normalization import RewardStatistics
from rewardserve.server.registry import ModelRegistry, ServedModel
from rewardserve.server.reloading import Reloader


def served(name: str, path: str, version: str, statistics=RewardStatistics(0.0, 1.0, "checkpoint")) -> ServedModel:
    return ServedModel(name, engine=object(), encoder=None, statistics=statistics, length_fit=None,
                       default_transform=None, info=None, version=version, path=path)


def reloader_for(tmp_path, load, check_room=lambda current, path: None, combinations=()):
    registry = ModelRegistry([served("rm", str(tmp_path / "a"), "v1")], list(combinations))
    return registry, Reloader(registry, load, check_room, str(tmp_path))


def test_a_good_checkpoint_replaces_the_model_and_says_both_versions(tmp_path):
    (tmp_path / "b").mkdir()
    registry, reloader = reloader_for(tmp_path, lambda name, path: served(name, path, "v2"))
    outcome = asyncio.run(reloader.reload("rm", str(tmp_path / "b")))
    assert (outcome.old_version, outcome.new_version, outcome.path) == ("v1", "v2", str(tmp_path / "b"))
    assert registry.get("rm").version == "v2"


def test_paths_outside_the_allowed_folder_are_refused(tmp_path):
    registry, reloader = reloader_for(tmp_path / "allowed", lambda name, path: served(name, path, "v2"))
    for path in (tmp_path / "elsewhere", tmp_path / "allowed" / ".." / "elsewhere", "/etc"):
        with pytest.raises(Forbidden, match="outside"):
            asyncio.run(reloader.reload("rm", str(path)))
    off = Reloader(registry, lambda name, path: None, lambda current, path: None, None)
    with pytest.raises(Forbidden, match="--allow-reload-from"):
        asyncio.run(off.reload("rm", str(tmp_path)))
    assert registry.get("rm").version == "v1"


def test_a_failed_load_or_room_check_leaves_the_old_model(tmp_path):
    def broken(name, path):
        raise OSError("model.safetensors: incomplete metadata")

    registry, reloader = reloader_for(tmp_path, broken)
    with pytest.raises(ReloadFailed, match="did not load: OSError: model.safetensors: incomplete metadata; rm v1 keeps"):
        asyncio.run(reloader.reload("rm", str(tmp_path)))

    def no_room(current, path):
        raise InsufficientMemory("loading needs 16.00 GiB on cuda:0, and 3.50 GiB is free")

    registry, reloader = reloader_for(tmp_path, lambda name, path: served(name, path, "v2"), no_room)
    with pytest.raises(InsufficientMemory, match="16.00 GiB"):
        asyncio.run(reloader.reload("rm", str(tmp_path)))
    assert registry.get("rm").version == "v1"


def test_a_combination_keeps_its_statistics(tmp_path):
    both = Combination.parse("e=ensemble rm rm2")
    registry = ModelRegistry([served("rm", "a", "v1"), served("rm2", "b", "w1")], [both])
    reloader = Reloader(registry, lambda name, path: served(name, path, "v2", statistics=None),
                        lambda current, path: None, str(tmp_path))
    with pytest.raises(ReloadFailed, match="combination 'e' whitens rm's scores"):
        asyncio.run(reloader.reload("rm", str(tmp_path)))
    assert registry.get("rm").version == "v1"


def test_one_reload_at_a_time(tmp_path):
    started = threading.Event()
    finish = threading.Event()

    def slow_load(name, path):
        started.set()
        finish.wait(10)
        return served(name, path, "v2")

    async def scenario():
        registry, reloader = reloader_for(tmp_path, slow_load)
        first = asyncio.create_task(reloader.reload("rm", str(tmp_path)))
        while not started.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(Conflict, match="already running"):
            await reloader.reload("rm", str(tmp_path))
        finish.set()
        return (await first).new_version

    assert asyncio.run(scenario()) == "v2"


def test_the_room_check_states_the_figures(monkeypatch, tmp_path):
    monkeypatch.setattr(server_main, "weights_bytes", lambda path, dtype: 16 * 2**30)
    monkeypatch.setattr(server_main, "free_memory", lambda device: 10 * 2**30)
    config = ServeConfig(model=str(tmp_path), device="cpu")
    with pytest.raises(InsufficientMemory, match=r"needs 16.00 GiB on cpu, and 10.00 GiB is free beside the serving"
                                                 r" rm v1 \(both are resident during the switch"):
        server_main.check_room(config, served("rm", "a", "v1"), str(tmp_path))
    monkeypatch.setattr(server_main, "free_memory", lambda device: 40 * 2**30)
    server_main.check_room(config, served("rm", "a", "v1"), str(tmp_path))  # fits: no error
