"""Hot reload: a new checkpoint loads beside the serving one, warms up, and takes its place in one step.

    reload(name, path): admin key checked (by the service) -> path inside --allow-reload-from -> room for both
    models on the device -> load and warm up in a thread (the forward worker keeps serving the old model) ->
    combinations still satisfied -> registry.replace(new): requests that start after it use the new model.

Requests already queued hold the old model (the batcher keeps each item's engine), so they finish on it and none
fails; the old model is freed when the last of them is answered. A checkpoint that fails to load or warm up
leaves the old model serving, and the call says why. One reload at a time: a reload runs to its end, holding the
lock, even if the client that asked for it goes away (it is logged); a second one meanwhile is refused (409), except
SIGHUP's, which waits its turn. The old version's metric series are dropped once the old model is freed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import metrics
from .errors import Conflict, Forbidden, InvalidInput, ReloadFailed, RewardServeError
from .registry import ModelRegistry, ServedModel

log = logging.getLogger(__name__)

LoadModel = Callable[[str, str], ServedModel]  # (name, path) -> a loaded, warmed-up model
CheckRoom = Callable[[ServedModel, str], None]  # raises InsufficientMemory with the figures


@dataclass(frozen=True)
class ReloadOutcome:
    model: str
    path: str
    old_version: str
    new_version: str
    seconds: float


class Reloader:
    def __init__(self, registry: ModelRegistry, load: LoadModel, check_room: CheckRoom, allowed_root: str | None):
        self.registry = registry
        self._load = load
        self._check_room = check_room
        self.allowed_root = Path(allowed_root).resolve() if allowed_root else None
        self._lock = asyncio.Lock()

    def allowed_path(self, path: str) -> str:
        """The checkpoint folder, resolved, if it and every file in it (links followed) lie inside
        --allow-reload-from; Forbidden otherwise."""
        if self.allowed_root is None:
            raise Forbidden("reload from a path is off: start the server with --allow-reload-from DIR and"
                            " --admin-key KEY")
        if "\x00" in path:
            raise InvalidInput("`path` holds a NUL character; send the checkpoint folder's path")
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.allowed_root):
            raise Forbidden(f"{path} is outside {self.allowed_root}, the folder this server may reload from"
                            " (--allow-reload-from)")
        if resolved.is_dir():
            outside = [f.name for f in resolved.iterdir() if not f.resolve().is_relative_to(self.allowed_root)]
            if outside:
                raise Forbidden(f"{path} holds links to files outside {self.allowed_root} ({', '.join(outside)});"
                                " copy the checkpoint's files into the folder")
        return str(resolved)

    async def reload(self, name: str, path: str | None = None, wait: bool = False) -> ReloadOutcome:
        """`path` None re-reads the model's own path (SIGHUP); a path given must pass `allowed_path`.

        wait: queue behind a running reload instead of refusing (SIGHUP). The reload runs in a task of its own that
        holds the lock to its end: a caller that is cancelled (its client went away) stops waiting, not reloading.
        """
        if self.registry.get(name).verifier:  # an unknown model is refused before anything else
            raise InvalidInput(f"{name!r} is a verifier: it has no checkpoint to reload (its checks change with the"
                               " server's flags)")
        target = None if path is None else self.allowed_path(path)
        if self._lock.locked() and not wait:
            raise Conflict("a reload is already running; retry when it has finished")
        await self._lock.acquire()  # no suspension when free: nothing can slip in between the check and this
        task = asyncio.create_task(self._reload_holding_lock(name, target), name=f"rewardserve-reload-{name}")
        task.add_done_callback(_retrieve_outcome)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                log.warning("the client asking to reload %s went away; the reload goes on to its end", name)
            raise

    async def _reload_holding_lock(self, name: str, path: str | None) -> ReloadOutcome:
        try:
            current = self.registry.get(name)  # read under the lock: a queued SIGHUP sees the last reload's model
            target = current.path if path is None else path
            began = time.perf_counter()
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, self._loaded, name, target, current)
                self._check_combinations(new)
            except RewardServeError as error:
                metrics.RELOADS.labels(name, error.kind).inc()
                log.warning("reload of %s from %s refused: %s", name, target, error.message)
                raise
            self.registry.replace(new)
            forget_when_freed(current, self.registry)
            metrics.MODEL_INFO.labels(name, new.version).set(1)
            metrics.RELOADS.labels(name, "ok").inc()
            outcome = ReloadOutcome(name, target, current.version, new.version, time.perf_counter() - began)
            log.info("reloaded %s: %s -> %s from %s in %.1f s", name, outcome.old_version, outcome.new_version,
                     target, outcome.seconds)
            return outcome
        finally:
            self._lock.release()

    def _loaded(self, name: str, path: str, current: ServedModel) -> ServedModel:
        try:
            self._check_room(current, path)
            return self._load(name, path)
        except RewardServeError:
            raise
        except Exception as error:  # any failure to read, load or warm up: the old model stays
            raise ReloadFailed(f"{path} did not load: {type(error).__name__}: {error}; {name} {current.version}"
                               " keeps serving") from error

    def _check_combinations(self, new: ServedModel) -> None:
        for combination in self.registry.combinations.values():
            if new.name in combination.models and new.statistics is None:
                raise ReloadFailed(f"combination {combination.name!r} whitens {new.name}'s scores, and {new.path}"
                                   f" has no reward statistics; {new.name} keeps its current version")


def _retrieve_outcome(task: asyncio.Task) -> None:
    """A reload whose client went away: its failure is already logged, so asyncio need not warn of it."""
    if not task.cancelled():
        task.exception()


def forget_when_freed(old: ServedModel, registry: ModelRegistry) -> None:
    """Drops the old version's metric series once the last request holding the old model is answered and it is
    freed, so the metrics keep one series per live version (not one per reload, forever)."""
    def forget(name: str, version: str) -> None:
        if name in registry.names and registry.get(name).version == version:
            return  # the same checkpoint reloaded within the same second: that version still serves
        with contextlib.suppress(KeyError):
            metrics.MODEL_INFO.remove(name, version)
        for protocol in metrics.PROTOCOLS:
            with contextlib.suppress(KeyError):
                metrics.MODEL_ITEMS.remove(name, version, protocol)

    weakref.finalize(old, forget, old.name, old.version)
