"""`rewardserve bench serve`: workload W through two transformers anchors, the project's scoring core in process,
and the real server in its own process over HTTP and gRPC, side by side in one run.

Rows (see docs/benchmarks.md): anchor naive b16, anchor sorted 64k, core (the default path at the smallest budget,
prefix sharing on), one core row per candidate of the server's start-up calibration (each forward path the device
has, at each budget that batches the workload differently), core with sharing off, then the real server (which
calibrates itself at start, and says what it chose) over HTTP 16x32, gRPC 16x32, HTTP 128x1, HTTP text 16x32.
Server rows count the real tokens the server itself reports (its `rewardserve_tokens_total`), so text items,
which it tokenizes, count what it scored. Workload G (`--workload G`, groups of responses to one prompt): the core with sharing off and on, then
HTTP and gRPC with a group a request; every row counts the tokens sent, and says what the forward computed.
"""
from __future__ import annotations

import asyncio
import json
import time

import torch

from rewardserve.server.batcher import plan, plan_batches, score_in_batches
from rewardserve.server.config import ServeConfig
from rewardserve.server.modeling import RewardModel, forward_paths, pad_right, resolve_dtype, synchronize
from rewardserve.server.simulated_forward import SimulatedForward

from .common import Budget, ServerProcess, best_of_passes, percentile
from .models import BenchModels, non_embedding_parameters

CALIBRATION_BUDGETS = ServeConfig.model_fields["calibration_budgets"].default
DEFAULT_BUDGET = min(CALIBRATION_BUDGETS)
SHARING_DEFAULT = ServeConfig.model_fields["min_shared_prefix"].default


def run(models: BenchModels, sequences: list[list[int]], device: torch.device, peak: float, budget: Budget,
        stand_in_us: float | None, progress) -> tuple[list[dict], dict]:
    """The rows, and what the real server chose at start (its forward path, budget and calibration table)."""
    rows: list[dict] = []
    model = RewardModel.load(str(models.reward), device=str(device), min_shared_prefix=SHARING_DEFAULT)
    parameters = non_embedding_parameters(model.network)
    real_tokens = sum(len(s) for s in sequences)

    def add(name: str, best: dict, passes: int, note: str = "") -> None:
        tokens = best.get("tokens", real_tokens)
        row = {"row": name, "tokens_per_s": tokens / best["seconds"], "sequences_per_s": len(sequences) / best["seconds"],
               "mfu": 2 * parameters * tokens / best["seconds"] / peak, "passes": passes, "seconds": best["seconds"],
               "tokens": tokens, "p50_s": percentile(best.get("latencies", []), 50),
               "p99_s": percentile(best.get("latencies", []), 99), "note": note}
        if "padded_tokens" in best:
            row["padded_per_real"] = best["padded_tokens"] / tokens
        if note:  # a stand-in forward does no arithmetic: utilisation means nothing
            row["mfu"] = None
        rows.append(row)
        progress(f"serve {models.name}: {name}: {row['tokens_per_s']:,.0f} tokens/s")

    if stand_in_us is None:
        anchor = _anchor_model(models, device)
        lengths = [len(s) for s in sequences]
        naive = [list(range(i, min(i + 16, len(sequences)))) for i in range(0, len(sequences), 16)]
        add("anchor naive b16", *best_of_passes(lambda: _anchor_pass(anchor, sequences, naive, model.pad_token_id,
                                                                       device), budget))
        sorted_64k = plan_batches(lengths, 65536)
        add("anchor sorted 64k", *best_of_passes(lambda: _anchor_pass(anchor, sequences, sorted_64k,
                                                                        model.pad_token_id, device), budget))
        del anchor
        forward, note = model, ""
    else:
        forward = SimulatedForward(stand_in_us)
        note = forward.describe()
    packs = stand_in_us is None and model.plans_packed  # a packed forward reads the real tokens alone
    best, passes = best_of_passes(lambda: _core_pass(forward, sequences, DEFAULT_BUDGET, device), budget)
    add("core", best | {"padded_tokens": real_tokens if packs else _padded_tokens(sequences, DEFAULT_BUDGET)},
        passes, note)
    if stand_in_us is None:  # every candidate the server's calibration chooses among, on the workload itself
        for path in forward_paths(model.device, model.packs):
            for max_batch_tokens in _distinct_budgets(sequences, CALIBRATION_BUDGETS, path != "padded"):
                with model.forward_path_as(path):
                    best, passes = best_of_passes(lambda: _core_pass(model, sequences, max_batch_tokens, device),
                                                  budget)
                padded = real_tokens if path != "padded" else _padded_tokens(sequences, max_batch_tokens)
                add(f"core {path} {max_batch_tokens // 1024}k", best | {"padded_tokens": padded}, passes)
    if model.min_shared_prefix and stand_in_us is None:  # W shares nothing: what looking for prefixes costs
        model.min_shared_prefix = None
        best, passes = best_of_passes(lambda: _core_pass(model, sequences, DEFAULT_BUDGET, device), budget)
        add("core, sharing off", best | {"padded_tokens": real_tokens}, passes, note)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    flags = ["--device", str(device)] + (["--stand-in-forward-us", str(stand_in_us)] if stand_in_us else [])
    with ServerProcess(str(models.reward), *flags) as server:
        chosen = server.info()["models"][0]
        progress(f"serve {models.name}: the server's calibration chose {chosen['forward_path']} at"
                 f" {chosen['max_batch_tokens']} tokens ({chosen['calibration']['how']},"
                 f" {chosen['calibration']['seconds']:.1f} s)")
        texts = _texts(models, sequences)
        for name, protocol, clients, per_request, form in (
            ("HTTP 16x32", "http", 16, 32, "input_ids"), ("gRPC 16x32", "grpc", 16, 32, "input_ids"),
            ("HTTP 128x1", "http", 128, 1, "input_ids"), ("HTTP text 16x32", "http", 16, 32, "text"),
        ):
            items = [{"input_ids": s} for s in sequences] if form == "input_ids" else [{"text": t} for t in texts]
            requests = [items[i:i + per_request] for i in range(0, len(items), per_request)]
            add(name, *best_of_passes(lambda: _server_pass(server, protocol, clients, requests), budget), note)
    core = next(r for r in rows if r["row"] == "core")
    for row in rows:
        row["ratio_to_core"] = row["tokens_per_s"] / core["tokens_per_s"]
    return rows, {key: chosen[key] for key in ("forward_path", "max_batch_tokens", "calibration")}


def _distinct_budgets(sequences: list[list[int]], budgets, packed: bool) -> list[int]:
    """The budgets that batch the workload differently (past the whole workload in one batch, more is the same)."""
    seen, distinct = set(), []
    for max_batch_tokens in sorted(budgets):
        batching = tuple(map(tuple, plan(sequences, max_batch_tokens, packed)))
        if batching not in seen:
            seen.add(batching)
            distinct.append(max_batch_tokens)
    return distinct


def run_shared(models: BenchModels, groups: list[list[list[int]]], device: torch.device, peak: float,
               budget: Budget, progress) -> list[dict]:
    """Workload G: the core with sharing off and on, then the server (sharing on, its default) over HTTP and gRPC,
    one group a request from 8 clients. Every row counts the tokens the clients sent, and says what was computed."""
    rows: list[dict] = []
    sequences = [s for group in groups for s in group]
    sent = sum(len(s) for s in sequences)

    def add(name: str, best: dict, passes: int, parameters: int) -> None:
        computed = best.get("computed_tokens")
        row = {"row": name, "tokens_per_s": sent / best["seconds"], "sequences_per_s": len(sequences) / best["seconds"],
               "mfu": 2 * parameters * (computed or sent) / best["seconds"] / peak, "passes": passes,
               "seconds": best["seconds"], "tokens": sent, "p50_s": percentile(best.get("latencies", []), 50),
               "p99_s": percentile(best.get("latencies", []), 99), "note": "",
               "computed_per_sent": None if computed is None else computed / sent}
        rows.append(row)
        progress(f"serve G {models.name}: {name}: {row['tokens_per_s']:,.0f} sent tokens/s"
                 + ("" if computed is None else f", computed/sent {computed / sent:.2f}"))

    for name, minimum in (("core, sharing off", 0), ("core, sharing on", SHARING_DEFAULT)):
        model = RewardModel.load(str(models.reward), device=str(device), min_shared_prefix=minimum)
        parameters = non_embedding_parameters(model.network)
        add(name, *best_of_passes(lambda: _core_pass(model, sequences, DEFAULT_BUDGET, device), budget), parameters)
        del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with ServerProcess(str(models.reward), "--device", str(device)) as server:
        for name, protocol in (("HTTP 8 clients, a group a request", "http"),
                               ("gRPC 8 clients, a group a request", "grpc")):
            requests = [[{"input_ids": s} for s in group] for group in groups]
            add(name, *best_of_passes(lambda: _server_pass(server, protocol, 8, requests), budget), parameters)
    core = next(r for r in rows if r["row"] == "core, sharing on")
    for row in rows:
        row["ratio_to_core"] = row["tokens_per_s"] / core["tokens_per_s"]
    return rows


# -- anchors: transformers as its users run it ----------------------------------------------------------------------
def _anchor_model(models: BenchModels, device: torch.device):
    from transformers import AutoModelForSequenceClassification

    dtype = resolve_dtype("auto", device)
    return AutoModelForSequenceClassification.from_pretrained(str(models.reward), dtype=dtype).to(device).eval()


@torch.inference_mode()
def _anchor_pass(model, sequences, batches, pad_token_id: int, device) -> dict:
    began, padded = time.perf_counter(), 0
    for batch in batches:
        input_ids, attention_mask = pad_right([sequences[i] for i in batch], pad_token_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logits.float().cpu()
        padded += input_ids.numel()
    return {"seconds": time.perf_counter() - began, "padded_tokens": padded}


# -- the core: what the server's forward worker runs ----------------------------------------------------------------
class _CountingForward:
    """The engine as the batcher drives it, adding up the tokens each forward says it ran."""

    def __init__(self, forward):
        self.forward, self.computed_tokens = forward, 0
        self.plans_packed = getattr(forward, "plans_packed", False)  # batched as the batcher batches for it

    def launch(self, sequences):
        pending = self.forward.launch(sequences)
        self.computed_tokens += getattr(pending, "computed_tokens", 0)
        return pending

    def collect(self, pending):
        return self.forward.collect(pending)


def _core_pass(forward, sequences, max_batch_tokens: int, device) -> dict:
    counting = _CountingForward(forward)
    synchronize(device)
    began = time.perf_counter()
    score_in_batches(counting, sequences, max_batch_tokens)
    synchronize(device)
    return {"seconds": time.perf_counter() - began, "computed_tokens": counting.computed_tokens or None}


def _padded_tokens(sequences, max_batch_tokens: int) -> int:
    """Rows x longest row over the batches the core forms (the work a padded forward does)."""
    return sum(len(b) * max(len(sequences[i]) for i in b)
               for b in plan_batches([len(s) for s in sequences], max_batch_tokens))


# -- the real server --------------------------------------------------------------------------------------------------
def _texts(models: BenchModels, sequences) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models.reward))
    return tokenizer.batch_decode(sequences, skip_special_tokens=True)


def _server_pass(server: ServerProcess, protocol: str, clients: int, requests: list[list[dict]]) -> dict:
    before, computed_before = server.metric("rewardserve_tokens_total"), server.metric("rewardserve_computed_tokens_total")
    began = time.perf_counter()
    latencies = asyncio.run(_http_load(server, clients, requests) if protocol == "http"
                            else _grpc_load(server, clients, requests))
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "latencies": latencies, "tokens": server.metric("rewardserve_tokens_total") - before,
            "computed_tokens": server.metric("rewardserve_computed_tokens_total") - computed_before}


async def _drive(clients: int, count: int, send) -> list[float]:
    """`clients` concurrent clients, each sending the next unsent request until none is left."""
    next_index, latencies = iter(range(count)), []

    async def client():
        for index in next_index:
            began = time.perf_counter()
            await send(index)
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


async def _http_load(server: ServerProcess, clients: int, requests: list[list[dict]]) -> list[float]:
    """aiohttp, not httpx: with 128 connections httpx's pool itself caps at about 90 requests/s on this machine's
    CPU, while aiohttp (like a raw socket client) reaches about 900, so the figure is the server's."""
    import aiohttp

    bodies = [json.dumps({"items": items}).encode() for items in requests]  # encoded before the clock matters
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(server.http_url, connector=connector, timeout=timeout) as http:
        async def send(index: int) -> None:
            async with http.post("/score", data=bodies[index], headers={"content-type": "application/json"}) as r:
                body = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"the server answered {r.status}: {body[:300]!r}")

        return await _drive(clients, len(bodies), send)


async def _grpc_load(server: ServerProcess, clients: int, requests: list[list[dict]]) -> list[float]:
    import grpc

    from rewardserve.proto import reward_pb2, reward_pb2_grpc

    messages = [reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(input_ids=item["input_ids"]) for item in items])
                for items in requests]
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=options) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        async def send(index: int) -> None:
            await stub.Score(messages[index], timeout=600)

        return await _drive(clients, len(messages), send)
