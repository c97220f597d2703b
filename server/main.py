"""The composition root of the server: build Batcher -> ScoringService -> both adapters, open uvicorn and grpc.aio
on one asyncio loop (so both protocols share one batcher), and answer 503 / NOT_SERVING while the models load and
warm up in a thread; then attach them and serve.

Shutdown (SIGTERM or SIGINT): stop taking new work (503 / UNAVAILABLE), finish what is queued, then close both
servers and exit 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import uvicorn

from .batcher import Batcher, score_in_batches
from .calibration import (Calibration, choose, measure_model, memory_cap, read_lengths, synthetic_batch, verify,
                          warm_shape_classes, workload_w_lengths)
from .config import ServeConfig
from .grpc_api import create_grpc_server, set_serving
from .http_api import create_app
from .embedded import resolve_model_path
from .judge import JudgeEncoder, JudgeModel, load_judge
from . import metrics
from .errors import InsufficientMemory, RewardServeError, StartupError
from .modeling import (FORWARD_PATHS, RewardModel, check_local_checkpoint, check_own_code, forward_paths,
                       free_memory, is_local, local_checkpoint, resolve_device, resolve_dtype, weights_bytes)
from .normalization import RewardStatistics, RewardTransform
from .packing import strict_kernels
from .process_rewards import STEP_SEPARATOR_KEY, ProcessRewardModel, StepEncoder
from .registry import ModelRegistry, ServedModel
from .reloading import Reloader
from .schemas import CalibrationOut, ModelInfo, ScoreItem, StepsOut
from .service import ScoringService
from .simulated_forward import SimulatedForward
from .tokenization import PLAIN_FORMAT_KEY, ItemEncoder, load_tokenizer, trained_max_length
from .verifiers import CheckerPool, checker_version

log = logging.getLogger("rewardserve")

SECONDS_FOR_CONNECTIONS_TO_CLOSE = 3
GRPC_DRAIN_GRACE_SECONDS = 5  # calls in flight on gRPC finish within this after SIGTERM (docker/k8s sizes its grace on it)


class _UvicornWithoutSignals(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after it stops, which would kill us before the gRPC side has drained."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn releases
        pass


def load_served_model(name: str, path: str, config: ServeConfig) -> ServedModel:
    """Loads one checkpoint with its tokenizer, statistics, length fit and default transform, and warms it up (a
    judge: `load_served_judge`)."""
    if name in config.judge_names():
        return load_served_judge(name, path, config)
    if name in config.prm_names():
        return load_served_prm(name, path, config)
    resolve_device(config.device)  # a device that is not there is the first thing to say
    folder = str(local_checkpoint(path, name))
    tokenizer = load_tokenizer(folder, config.trust_remote_code)
    model = RewardModel.load(folder, config.dtype, config.device, config.trust_remote_code,
                             max_length=config.max_length or trained_max_length(tokenizer),
                             min_shared_prefix=config.min_shared_prefix, objective=config.objective_choice(),
                             output_field=config.output_field)
    model.name = name  # the served name, which the batcher's per-model metrics are labelled with
    append_eos = model.is_decoder if config.append_eos is None else config.append_eos
    encoder = ItemEncoder(tokenizer, model.max_length, config.on_overflow, append_eos=append_eos,
                          embedding_rows=model.embedding_rows,
                          plain_format=plain_format_of(model.network.config, config.plain_chat_format))
    return serve_model(model, encoder, model.statistics, path, config)


def plain_format_of(checkpoint_config, flag: str) -> str:
    """The flag's plain chat format, or (auto) the one the checkpoint was trained with, else concat."""
    return getattr(checkpoint_config, PLAIN_FORMAT_KEY, None) or "concat" if flag == "auto" else flag


def load_served_judge(name: str, path: str, config: ServeConfig) -> ServedModel:
    """A causal LM served by its expected rating (server/judge.py), whitened with the flags' statistics or those of
    its ratings of --judge-calibration-set."""
    resolve_device(config.device)
    folder = str(local_checkpoint(resolve_model_path(path), name))
    constitution = Path(config.constitution).read_text().strip() if config.constitution else None
    model, encoder = load_judge(folder, load_tokenizer(folder), config.judge_template, constitution, config.dtype,
                                config.device, config.max_length, config.min_shared_prefix, config.trust_remote_code)
    model.name = name
    statistics = None
    if config.judge_reward_mean is not None:
        statistics = RewardStatistics(config.judge_reward_mean, config.judge_reward_std, source="server flags")
    elif config.judge_calibration_set:
        statistics = judge_statistics(model, encoder, config.judge_calibration_set)
    return serve_model(model, encoder, statistics, path, config, kind="judge")


PRM_STATISTICS = RewardStatistics(0.0, 1.0, source="a process reward model's aggregate step probability, not whitened")


def load_served_prm(name: str, path: str, config: ServeConfig) -> ServedModel:
    """A process reward model (server/process_rewards.py): the reward is its step scores' --step-aggregate, a
    probability, entering combinations as it is (statistics mean 0, std 1) unless --reward-mean/std say otherwise."""
    if config.stand_in_forward_us:
        raise StartupError("--stand-in-forward-us replaces a reward model's forward by one that scores 0; a process"
                           " reward model's answers are step scores: leave out --prm in benchmark mode")
    resolve_device(config.device)
    folder = str(local_checkpoint(path, name))
    tokenizer = load_tokenizer(folder, config.trust_remote_code)
    model = ProcessRewardModel.load_prm(folder, tuple(config.step_token_ids) if config.step_token_ids else None,
                                        config.dtype, config.device, config.max_length or trained_max_length(tokenizer),
                                        config.min_shared_prefix, config.trust_remote_code)
    model.name = name
    step_format = config.step_format()
    trained_with = getattr(model.network.config, STEP_SEPARATOR_KEY, None)
    if trained_with is not None and trained_with != step_format.separator:
        log.warning("process reward model %s was trained with the step separator %r and is served with %r: its steps"
                    " are read where training never labelled them; start it with --step-separator %r", name,
                    trained_with, step_format.separator, trained_with)
    encoder = StepEncoder(tokenizer, model.max_length, step_format, config.on_overflow, model.embedding_rows)
    served = serve_model(model, encoder, PRM_STATISTICS, path, config, kind="process_reward_model")
    steps = StepsOut(head=model.describe_head(), read=step_format.where_read(encoder),
                     aggregate=config.step_aggregate, **step_format.describe())
    log.info("process reward model %s: %s, read %s; reward = the %s of its step scores", name, steps.head,
             steps.read, config.step_aggregate)
    return dataclasses.replace(served, info=served.info.model_copy(update={"steps": steps}),
                               step_aggregate=config.step_aggregate)


def judge_statistics(model: JudgeModel, encoder: JudgeEncoder, path: str) -> RewardStatistics:
    """The mean and std of the judge's ratings of a calibration set's responses, scored at start."""
    items = []
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise StartupError(f"--judge-calibration-set {path}: {type(error).__name__}: {str(error)[:200]}; give a"
                           " UTF-8 JSON Lines file") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            responses = [row["response"]] if "response" in row else [row["chosen"], row["rejected"]]
            items += [ScoreItem(prompt=row.get("prompt", ""), response=response) for response in responses]
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise StartupError(f"--judge-calibration-set {path}, line {number}: {type(error).__name__}: {error}; each"
                               " line is {\"prompt\", \"response\"} or {\"prompt\", \"chosen\", \"rejected\"}")
    if len(items) < 2:
        raise StartupError(f"--judge-calibration-set {path} has {len(items)} responses; whitening needs two or more")
    sequences = []
    for number, item in enumerate(items, 1):
        try:
            sequences.append(encoder.encode(item).input_ids)
        except RewardServeError as error:  # too long for the judge, a token it has no embedding for
            raise StartupError(f"--judge-calibration-set {path}, response {number}: {error.message}") from None
    ratings = [row[0] for row in score_in_batches(model, sequences)]
    mean = sum(ratings) / len(ratings)
    std = math.sqrt(sum((r - mean) ** 2 for r in ratings) / (len(ratings) - 1))
    if not std > 0:
        raise StartupError(f"the judge rates every response of {path} {mean:.4f}: no spread to whiten by")
    log.info("judge %s: ratings of %d calibration responses have mean %.4f, std %.4f", model.name, len(ratings),
             mean, std)
    return RewardStatistics(mean, std, source=f"calibration set {Path(path).name} ({len(ratings)} responses)")


def serve_model(model: RewardModel, encoder: ItemEncoder, statistics: RewardStatistics | None, path: str,
                config: ServeConfig, kind: str = "reward_model") -> ServedModel:
    """What every model goes through before it serves: statistics and default transform, warm-up, the forward's
    calibration, its description."""
    name = model.name
    if config.max_length is not None and config.max_length > model.max_length:
        log.warning("--max-length %d is over the %d positions of model %s (%s): it scores at most %d tokens",
                    config.max_length, model.max_positions, name, model.architecture, model.max_length)
    if config.reward_mean is not None:
        statistics = RewardStatistics(config.reward_mean, config.reward_std, source="server flags")
    transform = config.transform
    if transform == "auto":
        transform = "whiten" if statistics else "raw"
    if transform == "whiten" and statistics is None:
        raise StartupError(
            f"--transform whiten needs reward statistics, and {path} has none in its config;"
            " pass --reward-mean and --reward-std (a judge: --judge-calibration-set, or --judge-reward-mean and"
            " --judge-reward-std), or choose --transform raw"
        )
    if transform == "debias" and model.length_fit is None:
        raise StartupError(f"--transform debias needs the checkpoint's length fit, and {path} has none"
                           " (`reward_length_fit` in config.json, which `rewardserve train` writes); choose another")
    default_transform = RewardTransform(transform, statistics if transform == "whiten" else None, config.beta,
                                        model.length_fit if transform == "debias" else None)
    warm_up(model, path)
    calibration = configure_forward(model, config)
    info = ModelInfo(
        model=name, path=str(path), version=model.version, architecture=model.architecture,
        dtype=str(model.dtype).removeprefix("torch."), device=str(model.device), max_length=model.max_length,
        on_overflow=encoder.on_overflow, chat_template=encoder.has_chat_template,
        plain_chat_format=None if encoder.has_chat_template else encoder.plain_format,
        default_transform=default_transform.describe(), statistics=asdict(statistics) if statistics else None,
        max_items_per_request=config.max_items_per_request, max_batch_tokens=model.max_batch_tokens,
        forward_path=model.forward_path, length_fit=asdict(model.length_fit) if model.length_fit else None,
        calibration=CalibrationOut(how=calibration.how, seconds=round(calibration.seconds, 2),
                                   candidates=calibration.rows()),
        min_shared_prefix=model.min_shared_prefix if model.plans_packed else None,
        shared_prefix=model.shared_prefix_note(), kind=kind, outputs=list(model.output_names),
        objective=model.objective_formula or None, code_files=model.code_hashes or None,
    )
    engine, output_names = model, model.output_names
    if config.stand_in_forward_us:
        engine, output_names = SimulatedForward(config.stand_in_forward_us), ()  # it scores 0, one number an item
        log.warning("benchmark mode: %s", engine.describe())
        info.forward = engine.describe()
    log.info("model %s ready: %s, version %s", name, path, model.version)
    return ServedModel(name, engine, encoder, statistics, model.length_fit, default_transform, info, model.version,
                       str(path), output_names)


VERIFIER_STATISTICS = RewardStatistics(0.0, 1.0, source="a verifier's 0/1 verdict, not whitened")


def load_served_verifiers(config: ServeConfig) -> list[ServedModel]:
    """The answer checkers (server/verifiers.py), one worker pool for all of them. Their rewards are not whitened:
    a 0/1 verdict's mean is the policy's accuracy, which training moves, so fixed statistics would move its zero;
    GRPO and RLOO centre each group themselves; and unwhitened, a combination's weights read as points per right
    answer. Their statistics (mean 0, std 1) let combinations take them as they are."""
    specs = config.verifier_specs()
    if not specs:
        return []
    own = [spec for spec in specs if spec.kind == "python"]
    for spec in own:
        log.warning("--trust-verifier-code: verifier %s runs %s, your own code, in the server's worker processes",
                    spec.name, spec.option)
    try:
        versions = [checker_version(spec) for spec in specs]
    except ValueError as error:
        raise StartupError(str(error)) from None
    pool = CheckerPool(specs, config.verifier_workers, config.verifier_timeout)
    began = time.perf_counter()
    try:
        pool.start()
    except RuntimeError as error:
        pool.close()
        raise StartupError(f"--verifier: {error}") from None
    log.info("verifiers %s ready: %d worker processes, %.1f s per check at most (started in %.1f s)",
             ", ".join(spec.name for spec in specs), config.verifier_workers, config.verifier_timeout,
             time.perf_counter() - began)
    raw = RewardTransform("raw")
    served = []
    for spec, version in zip(specs, versions):
        info = ModelInfo(model=spec.name, path="", version=version, architecture=f"verifier:{spec.kind}", dtype="none",
                         device=f"cpu ({config.verifier_workers} worker processes)", max_length=0,
                         on_overflow="error", chat_template=False, default_transform=raw.describe(),
                         statistics=asdict(VERIFIER_STATISTICS), max_items_per_request=config.max_items_per_request,
                         max_batch_tokens=0, forward_path="", kind="verifier", verifier=spec.describe(),
                         outputs=["correct", "answer_found", "timed_out"])
        served.append(ServedModel(spec.name, None, None, VERIFIER_STATISTICS, None, raw, info, version, "",
                                  verifier=spec, checker=pool))
    return served


def configure_forward(model: RewardModel, config: ServeConfig) -> Calibration:
    """Sets the model's forward path and batch budget: as --forward-path and --max-batch-tokens pin them, or the
    fastest the calibration measured where either is auto (server/calibration.py)."""
    paths = forward_paths(model.device, model.packs)
    if config.forward_path == "packed":
        paths = paths[:1]  # the device's packed kernel, or padded for an architecture that does not pack
    elif config.forward_path != "auto":
        if config.forward_path not in paths:
            raise StartupError(f"--forward-path {config.forward_path} is not available for {model.name}"
                               f" ({model.architecture}) on {model.device}; its paths there: {', '.join(paths)}")
        paths = [config.forward_path]
    budgets = [config.max_batch_tokens] if config.max_batch_tokens else sorted(set(config.calibration_budgets))
    if len(paths) == 1 and len(budgets) == 1:
        calibration = Calibration(paths[0], budgets[0], [], 0.0, "pinned by --forward-path and --max-batch-tokens")
        warm_pinned(model, calibration.path)
    else:
        lengths = read_lengths(config.calibration_lengths) if config.calibration_lengths else workload_w_lengths()
        calibration = choose(paths, budgets, measure_model(model, lengths), config.calibration_seconds,
                             memory_cap(model.device))
        log.info("calibration of %s in %.1f s (%s): serving %s at %d tokens a batch\n%s", model.name,
                 calibration.seconds, calibration.how, calibration.path, calibration.budget, calibration.table())
    model.forward_path, model.max_batch_tokens = calibration.path, calibration.budget
    metrics.serving_path(model.name, calibration.path, calibration.budget)
    for other, budget in itertools.product(FORWARD_PATHS, budgets):  # this model's last table (same budgets)
        with contextlib.suppress(KeyError):
            metrics.CALIBRATION.remove(model.name, other, str(budget))
    for measured in calibration.measurements:
        if measured.tokens_per_s:
            metrics.CALIBRATION.labels(model.name, measured.path, str(measured.budget)).set(measured.tokens_per_s)
    return calibration


def warm_pinned(model: RewardModel, path: str) -> None:
    """A pinned kernel that compiles is checked and warmed at start, as the calibration would (a failure is a
    one-line start-up error, not a silent fallback on the first request)."""
    if path not in ("packed-flex", "packed-varlen"):
        return
    try:
        with model.forward_path_as(path), strict_kernels():
            verify(model, path, random.Random(0))
            warm_shape_classes(model)
            model.score_batch(synthetic_batch(workload_w_lengths(), min(model.max_batch_tokens, 16384), True,
                                              model.max_length, model.embedding_rows, random.Random(0)))
    except Exception as error:
        raise StartupError(f"--forward-path {path} cannot run for {model.name} on {model.device}"
                           f" ({type(error).__name__}: {str(error)[:300]}); pin another path or leave it auto")
    log.info("%s: pinned %s checked against padded and warmed up", model.name, path)


def warm_up(model: RewardModel, path: str) -> None:
    """Its scores must be finite numbers, or the checkpoint is refused (at start, or at a reload, where the old
    model keeps serving). Along the padded path: a fast kernel is first run by the calibration, at the shapes it
    will serve and under the guard that reports its failures, never switched off by a toy batch here."""
    rows = model.embedding_rows
    sequences = [[model.pad_token_id] * 8, [(3 + i) % rows for i in range(min(32, model.max_length))]]
    with model.forward_path_as("padded"):
        scores = model.score_batch(sequences)
    if not all(math.isfinite(value) for score in scores for value in (score if isinstance(score, list) else [score])):
        raise StartupError(f"{path} gives non-finite scores {scores} on warm-up (NaN or infinite weights?): refused")


def check_room(config: ServeConfig, current: ServedModel, path: str) -> None:
    """Both models are resident during a switch: refuse a reload the device cannot hold, with the figures."""
    device = resolve_device(config.device)
    needed, free = weights_bytes(path, resolve_dtype(config.dtype, device)), free_memory(device)
    if needed is not None and free is not None and needed > 0.9 * free:
        raise InsufficientMemory(
            f"loading {path} needs {needed / 2**30:.2f} GiB on {device}, and {free / 2**30:.2f} GiB is free beside"
            f" the serving {current.name} {current.version} (both are resident during the switch; at most 90% of"
            " what is free is used): free memory on the device, or restart with the new checkpoint")


def build_service(config: ServeConfig) -> ScoringService:
    """The scoring core before its models are loaded: it answers NotReady until `attach_models`."""
    # each model plans with its own (calibrated) budget; this one sizes the planning window until they are loaded
    batcher = Batcher(None, config.max_batch_tokens or min(config.calibration_budgets), config.max_wait_ms,
                      config.max_queue_items)
    return ScoringService(
        None, batcher, beta=config.beta, max_items_per_request=config.max_items_per_request,
        api_key=config.api_key.get_secret_value() if config.api_key else None,
        tokenizer_threads=config.tokenizer_threads, rate_limit=config.rate_limit,
        admin_key=config.admin_key.get_secret_value() if config.admin_key else None,
        max_inflight_characters=config.max_inflight_characters, step_separator=config.step_separator,
    )


def attach_models(service: ScoringService, config: ServeConfig, models: list[ServedModel]) -> None:
    combinations = config.combinations()
    statistics = {model.name: model.statistics for model in models}
    for combination in combinations:
        try:
            combination.check(statistics)
        except ValueError as error:
            raise StartupError(str(error)) from None
    registry = ModelRegistry(models, combinations, config.default_reward)
    reloader = Reloader(registry, lambda name, path: load_served_model(name, path, config),
                        lambda current, path: check_room(config, current, path), config.allow_reload_from)
    for model in models:
        metrics.MODEL_INFO.labels(model.name, model.version).set(1)
    budgets = [model.info.max_batch_tokens for model in models if not model.verifier]  # a verifier plans no batch
    service.batcher.max_batch_tokens = max(budgets, default=service.batcher.max_batch_tokens)  # the planning window
    service.batcher.start()
    service.start_serving(registry, reloader)


async def reload_all_from_their_paths(service: ScoringService) -> None:
    """SIGHUP: every model re-reads its own checkpoint folder (a refresh written in place)."""
    for name in [model.name for model in service.registry.models() if not model.verifier]:
        try:
            await service.reloader.reload(name, wait=True)  # after a reload that is running, not instead of it
        except RewardServeError as error:
            log.error("SIGHUP: %s not reloaded: %s", name, error.message)


async def serve(config: ServeConfig) -> None:
    """Opens both ports first (503 / NOT_SERVING while loading, what readiness probes expect), then loads and warms
    the models, then serves until SIGTERM or SIGINT."""
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # until the models are up, a SIGHUP (whose default action ends the process) has nothing to reload
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("SIGHUP while the models load: nothing to reload"
                                                               " yet; send it again once /ready answers 200"))
    check_before_listening(config)
    service = build_service(config)
    http, http_task, http_port = await start_http(config, service)
    grpc_server, grpc_port, health = await start_grpc(config, service)
    endpoints = "http={}://{}:{} grpc={}".format(
        "https" if config.tls_cert else "http", config.host, http_port,
        f"{config.host}:{grpc_port}{' (TLS)' if config.tls_cert else ''}" if grpc_server else "off")
    log.info("listening: %s; /ready answers 503 until the models are loaded and warm", endpoints)
    try:
        loading = load_in_background(loop, lambda: [load_served_model(name, path, config)
                                                    for name, path in config.model_specs()]
                                     + load_served_verifiers(config))
        await asyncio.wait([loading, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            log.info("stopped while loading the models")
            loading.cancel()
            await close_servers(http, http_task, grpc_server)
            return
        attach_models(service, config, loading.result())
        # No local keeps the first versions: after a reload only the registry and requests in flight may hold them.
        loading = None
    except BaseException:
        await close_servers(http, http_task, grpc_server)
        raise
    if health is not None:
        await set_serving(health, True)
    log.info("rewardserve ready: model=%s %s (%.1f s to start)", ",".join(service.registry.names), endpoints,
             time.perf_counter() - started)

    reloads: set[asyncio.Task] = set()  # held, so a running reload is not garbage-collected

    def on_sighup() -> None:
        task = asyncio.create_task(reload_all_from_their_paths(service))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await asyncio.wait([asyncio.create_task(stop.wait()), http_task], return_when=asyncio.FIRST_COMPLETED)
    await shutdown(service, http, http_task, grpc_server, health)


def check_before_listening(config: ServeConfig) -> None:
    """What is wrong without loading anything is said before the ports open: the device, the local folders."""
    resolve_device(config.device)
    for name, path in config.model_specs():
        if is_local(path):
            check_local_checkpoint(path, name)
            check_own_code(path, config.trust_remote_code, name)


LOAD_THREAD = "rewardserve-load"


def load_in_background(loop: asyncio.AbstractEventLoop, load) -> asyncio.Future:
    """Runs `load()` in a daemon thread: the ports answer meanwhile, and a SIGTERM while loading exits at once
    instead of waiting for the load to finish (an executor's threads are joined at exit)."""
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = load(), None
        except BaseException as caught:
            result, error = None, caught
        with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped while this loaded
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=LOAD_THREAD, daemon=True).start()
    return future


async def start_http(config: ServeConfig, service: ScoringService):
    """uvicorn on the loop; returns (server, its task, the bound port) once it listens."""
    http = _UvicornWithoutSignals(uvicorn.Config(
        create_app(service, config.max_body_bytes), host=config.host, port=config.http_port,
        log_level=config.log_level, access_log=False, lifespan="off",
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
        # By the time uvicorn stops, the batcher has drained and every answer is written; an idle keep-alive TLS
        # connection would otherwise hold the exit for 30 s (asyncio waits that long for the client's close_notify)
        timeout_graceful_shutdown=SECONDS_FOR_CONNECTIONS_TO_CLOSE,
    ))
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            raise StartupError(f"the HTTP server did not start on {config.host}:{config.http_port}"
                               " (is the port in use?)")
        await asyncio.sleep(0.01)
    return http, http_task, http.servers[0].sockets[0].getsockname()[1]


async def start_grpc(config: ServeConfig, service: ScoringService):
    """grpc.aio with its health service NOT_SERVING; returns (server, bound port, health), or Nones when off."""
    if config.grpc_port == 0:
        return None, 0, None
    tls = (Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()) if config.tls_cert else None
    grpc_server, grpc_port, health = await create_grpc_server(
        service, f"{config.host}:{max(config.grpc_port, 0)}", config.max_body_bytes, tls)
    await grpc_server.start()
    await set_serving(health, False)
    return grpc_server, grpc_port, health


async def close_servers(http, http_task, grpc_server) -> None:
    http.should_exit = True
    if grpc_server is not None:
        await grpc_server.stop(grace=1)
    await http_task


async def shutdown(service: ScoringService, http, http_task, grpc_server, health) -> None:
    log.info("draining: new requests get 503 / UNAVAILABLE while queued work finishes")
    drain_started = time.perf_counter()
    service.start_draining()
    if health is not None:
        await set_serving(health, False)
    await service.batcher.drain_and_stop()
    http.should_exit = True
    if grpc_server is not None:
        await grpc_server.stop(grace=GRPC_DRAIN_GRACE_SECONDS)
    await http_task
    service.close()
    for pool in {id(model.checker): model.checker for model in service.registry.models() if model.checker}.values():
        pool.close()
    log.info("stopped after draining for %.2f s", time.perf_counter() - drain_started)


def main(config: ServeConfig) -> None:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("rewardserve serve " + json.dumps(config.printable(), indent=2), flush=True)
    asyncio.run(serve(config))
    if any(thread.name == LOAD_THREAD and thread.is_alive() for thread in threading.enumerate()):
        # stopped while loading: the load thread may be inside torch's C++ (a judge rating its calibration set),
        # and tearing the interpreter down under it aborts ("terminate called without an active exception")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
