"""The reload rules without a server: paths, one at a time, failures that leave the old model, the room check."""
from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from rewardserve.server import main as server_main
from rewardserve.server import metrics
from rewardserve.server.combinations import Combination
from rewardserve.server.config import ServeConfig
from rewardserve.server.errors import Conflict, Forbidden, InsufficientMemory, InvalidInput, ReloadFailed
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


def slow_loader():
    """A load that signals it began and waits to be let finish; versions v2, v3, ... in call order."""
    started, finish, calls = threading.Event(), threading.Event(), []

    def load(name, path):
        calls.append(path)
        started.set()
        finish.wait(10)
        return served(name, path, f"v{len(calls) + 1}")

    return load, started, finish, calls


def test_a_reload_whose_client_goes_away_runs_to_its_end_and_keeps_the_lock(tmp_path, caplog):
    load, started, finish, _ = slow_loader()

    async def scenario():
        registry, reloader = reloader_for(tmp_path, load)
        asked = asyncio.create_task(reloader.reload("rm", str(tmp_path)))
        while not started.is_set():
            await asyncio.sleep(0.01)
        asked.cancel()  # the HTTP handler is cancelled when its client disconnects
        with pytest.raises(asyncio.CancelledError):
            await asked
        with pytest.raises(Conflict, match="already running"):  # the lock is still held by the running reload
            await reloader.reload("rm", str(tmp_path))
        finish.set()
        while reloader._lock.locked():
            await asyncio.sleep(0.01)
        return registry.get("rm").version

    assert asyncio.run(scenario()) == "v2"
    assert "went away; the reload goes on to its end" in caplog.text


def test_sighup_during_a_reload_rereads_after_it(tmp_path):
    """SIGHUP's reload waits for the running one, then re-reads the model's (new) path, instead of being dropped."""
    load, started, finish, calls = slow_loader()
    (tmp_path / "b").mkdir()

    async def scenario():
        registry, reloader = reloader_for(tmp_path, load)
        first = asyncio.create_task(reloader.reload("rm", str(tmp_path / "b")))
        while not started.is_set():
            await asyncio.sleep(0.01)
        sighup = asyncio.create_task(reloader.reload("rm", wait=True))
        await asyncio.sleep(0.05)
        assert not sighup.done()
        finish.set()
        return (await first).new_version, (await sighup).new_version, registry.get("rm").version

    assert asyncio.run(scenario()) == ("v2", "v3", "v3")
    assert calls == [str(tmp_path / "b"), str(tmp_path / "b")]  # the second re-read the path the first loaded


def test_reload_paths_with_nul_or_links_out_of_the_folder_are_refused(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "ckpt").mkdir(parents=True)
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"secret")
    (allowed / "ckpt" / "model.safetensors").symlink_to(outside / "model.safetensors")
    _, reloader = reloader_for(allowed, lambda name, path: served(name, path, "v2"))
    with pytest.raises(InvalidInput, match="NUL"):
        asyncio.run(reloader.reload("rm", str(allowed / "ck\x00pt")))
    with pytest.raises(Forbidden, match=r"links to files outside .* \(model.safetensors\)"):
        asyncio.run(reloader.reload("rm", str(allowed / "ckpt")))


def test_a_freed_version_leaves_no_metric_series(tmp_path):
    """After reloads, the metrics hold one model_info series per model, and model_items series of the live version
    alone (whatever protocol counted the old ones)."""
    (tmp_path / "b").mkdir()
    versions = iter(["v2", "v3", "v4"])
    registry, reloader = reloader_for(tmp_path, lambda name, path: served(name, path, next(versions)))
    metrics.MODEL_INFO.labels("rm", "v1").set(1)
    metrics.MODEL_ITEMS.labels("rm", "v1", "http").inc()
    for protocol in ("http", "grpc", "python"):
        version = asyncio.run(reloader.reload("rm", str(tmp_path / "b"))).new_version
        metrics.MODEL_ITEMS.labels("rm", version, protocol).inc()
    gc.collect()
    series = [s.labels["version"] for s in metrics.MODEL_INFO.collect()[0].samples if s.labels["model"] == "rm"]
    items = {s.labels["version"] for s in metrics.MODEL_ITEMS.collect()[0].samples if s.labels["model"] == "rm"}
    assert series == ["v4"] and items == {"v4"}
