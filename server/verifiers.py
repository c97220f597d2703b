"""Answer checkers served as models: verifiable rewards beside the reward models.

    --verifier correct=math             the final answer against the item's `reference`, by mathematical equivalence
    --verifier same=exact               the response, normalised, equal to the reference
    --verifier fmt=regex:PATTERN        the pattern found in the response (a format reward; no reference)
    --verifier own=python:pkg.mod:fn    a team's own checker, fn(response, reference) -> float | bool | dict,
                                        behind --trust-verifier-code

A check's score is 1.0 or 0.0 (an own checker may give any finite number) with a verdict: `correct`, `wrong`,
`no_answer` (nothing to compare: no boxed answer nor final-answer line) or `timeout`. Each check runs in a worker
process with a time limit: symbolic equivalence (sympy, through Hugging Face's math-verify) can run for minutes on
hostile LaTeX, and a regular expression can backtrack for ever. A check past its limit is an answer (`timeout`,
score 0.0), its worker is killed and replaced, and the event loop and the reward models' batcher never wait on it.
A checker that raises is its item's error (`unscorable_item`), never its batch's.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal

from . import metrics

log = logging.getLogger(__name__)

VerifierKind = Literal["math", "exact", "regex", "python"]
KINDS = ("math", "exact", "regex", "python")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
NEEDS_REFERENCE = {"math", "exact"}
ANSWER_CHARS = 4096  # what a math check reads: from the last \boxed, else the response's tail (the answer is last)
PLAIN_NUMBER = re.compile(r"^\s*-?\d+(?:\.\d+)?\s*$")
# a sum, difference or product left to compute: `8 + 11`, `3 \times 4` (fractions and powers are final forms)
UNEVALUATED = re.compile(r"\d\s*(?:[-+*×·]|\\times|\\cdot)\s*\(?-?\d")
FINAL_ANSWER = re.compile(r"(?:final answer|answer)\s*(?:is|:)?\s*[:=]?\s*(.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class VerifierSpec:
    name: str
    kind: VerifierKind
    option: str = ""  # regex: the pattern; python: module:function; math: "" or "lenient"

    @classmethod
    def parse(cls, spec: str) -> "VerifierSpec":
        """`NAME=KIND[:OPTION]`; ValueError says what is wrong and how to write it."""
        name, equals, body = spec.partition("=")
        kind, _, option = body.partition(":")
        name, kind = name.strip(), kind.strip()
        if not equals or not NAME.match(name) or kind not in KINDS:
            raise ValueError(f"--verifier {spec!r}: write NAME=KIND[:OPTION] with KIND one of {', '.join(KINDS)},"
                             " e.g. correct=math, same=exact, fmt=regex:PATTERN, own=python:my_checks:score")
        if kind == "regex":
            try:
                re.compile(option)
            except re.error as error:
                raise ValueError(f"--verifier {spec!r}: the pattern does not compile: {error}") from None
            if not option:
                raise ValueError(f"--verifier {spec!r}: regex needs a pattern, e.g. fmt=regex:\\\\boxed")
        if kind == "python" and option.count(":") != 1:
            raise ValueError(f"--verifier {spec!r}: python takes MODULE:FUNCTION, e.g. own=python:my_checks:score")
        if kind == "math" and option not in ("", "lenient"):
            raise ValueError(f"--verifier {spec!r}: math takes no option or `lenient` (the last line is the answer"
                             " when there is neither a boxed answer nor a final-answer line)")
        if kind == "exact" and option:
            raise ValueError(f"--verifier {spec!r}: exact takes no option")
        return cls(name, kind, option)

    @property
    def needs_reference(self) -> bool:
        return self.kind in NEEDS_REFERENCE

    def describe(self) -> str:
        return f"{self.kind}:{self.option}" if self.option else self.kind


@dataclass(frozen=True)
class Check:
    """One item's verdict: `correct`, `wrong`, `no_answer` or `timeout`; `answer` as the checker read it."""

    verdict: str
    score: float
    answer: str | None = None


class CheckFailed(Exception):
    """The checker raised, or its process died: the item's error, said in one line."""


# -- the checks themselves (they run in the worker processes) -------------------------------------------------------
def normalise(text: str) -> str:
    """Exact match up to case, Unicode form, spacing and a closing full stop: `The Answer.` equals `the answer`."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split()).rstrip(".").strip()


def answer_segment(response: str, lenient: bool = False) -> str | None:
    """Where the final answer is: from the last `\\boxed`, else the last final-answer line (`Answer: 7`, `The final
    answer is 7`), else (lenient) the last non-empty line; None when there is none."""
    start = response.rfind("\\boxed")
    if start >= 0:
        return response[start:start + ANSWER_CHARS]
    lines = [line.strip() for line in response[-ANSWER_CHARS:].splitlines() if line.strip()]
    for line in reversed(lines):
        found = FINAL_ANSWER.search(line)
        if found:
            return found.group(1).strip().rstrip(".")
    return lines[-1].rstrip(".") if lenient and lines else None


def parse_math(text: str) -> list:
    """math-verify's parse of an answer or a reference: LaTeX is read between dollars (as math-verify expects it),
    plain text as an expression (`12 apples` is 12), either way round when the first finds nothing."""
    from math_verify import parse

    if "$" in text or "\\boxed" in text:
        return parse(text)
    if "\\" in text:
        return parse(f"${text}$")
    return parse(text) or parse(f"${text}$")


def check_math(response: str, reference: str, lenient: bool = False) -> Check:
    from math_verify import verify

    segment = answer_segment(response, lenient)
    found = parse_math(segment) if segment else []
    if not found:
        return Check("no_answer", 0.0)
    gold = parse_math(reference)
    answer = str(found[-1])
    if PLAIN_NUMBER.match(reference) and UNEVALUATED.search(answer.rsplit("=", 1)[-1]):
        # math-verify evaluates `8 + 11` to 19: a policy echoing the question would be right every time (a GRPO run
        # on the arithmetic task learned exactly that), so a number is answered with a number
        return Check("wrong", 0.0, answer)
    return Check("correct", 1.0, answer) if gold and verify(gold, found) else Check("wrong", 0.0, answer)


def check_exact(response: str, reference: str) -> Check:
    same = normalise(response) == normalise(reference)
    return Check("correct" if same else "wrong", float(same), response[:200])


def check_regex(response: str, pattern: str) -> Check:
    found = re.search(pattern, response)
    return Check("correct", 1.0, found.group(0)[:200]) if found else Check("wrong", 0.0)


def load_function(option: str):
    module, _, function = option.partition(":")
    return getattr(importlib.import_module(module), function)


def check_python(function, response: str, reference: str | None) -> Check:
    """An own checker returns a number, a bool, or a dict with `score` (and `verdict`, `answer` if it likes)."""
    result = function(response, reference)
    if isinstance(result, dict):
        score = float(result["score"])
        verdict, answer = str(result.get("verdict", "correct" if score > 0 else "wrong")), result.get("answer")
    else:
        score = float(result)
        verdict, answer = ("correct" if score > 0 else "wrong"), None
    if not math.isfinite(score):
        raise ValueError(f"the checker returned {score}, not a finite number")
    return Check(verdict, score, None if answer is None else str(answer)[:200])


def run_check(spec: VerifierSpec, response: str, reference: str | None, functions: dict) -> Check:
    if spec.kind == "math":
        return check_math(response, reference, lenient=spec.option == "lenient")
    if spec.kind == "exact":
        return check_exact(response, reference)
    if spec.kind == "regex":
        return check_regex(response, spec.option)
    if spec.name not in functions:
        functions[spec.name] = load_function(spec.option)
    return check_python(functions[spec.name], response, reference)


def worker_main(fd: int, specs: list[VerifierSpec]) -> None:
    """A worker process (`python -m rewardserve.server.verifiers FD SPECS`): imports what its checkers need once,
    then answers one check at a time on its end of a socket pair."""
    connection = Connection(fd)
    functions: dict = {}
    if any(spec.kind == "math" for spec in specs):
        check_math("\\boxed{1}", "1")  # sympy and the LaTeX grammar load now, not inside the first timed check
    for spec in specs:
        if spec.kind == "python":
            functions[spec.name] = load_function(spec.option)
    connection.send("ready")
    while True:
        job = connection.recv()
        if job is None:
            return
        index, response, reference = job  # plain values both ways: nothing to unpickle but builtins
        try:
            check = run_check(specs[index], response, reference, functions)
            connection.send(("ok", check.verdict, check.score, check.answer))
        except Exception as error:  # the item's error, said in one line; the worker goes on
            connection.send(("error", f"{type(error).__name__}: {str(error)[:300]}"))


# -- the pool -----------------------------------------------------------------------------------------------------
class FairQueue:
    """Checks waiting for a worker, taken one request at a time in turn: a request of a thousand hostile items
    cannot keep another request's checks waiting behind all of them."""

    def __init__(self):
        self._by_request: dict[object, deque] = {}
        self._turns: deque = deque()
        self._ready = threading.Condition()

    def put_all(self, request: object, jobs: list) -> None:
        with self._ready:
            if request not in self._by_request:
                self._by_request[request] = deque()
                self._turns.append(request)
            self._by_request[request].extend(jobs)
            self._ready.notify(len(jobs))

    def get(self):
        with self._ready:
            while not self._turns:
                self._ready.wait()
            request = self._turns.popleft()
            jobs = self._by_request[request]
            job = jobs.popleft()
            if jobs:
                self._turns.append(request)
            else:
                del self._by_request[request]
            return job


@dataclass
class _Job:
    spec: VerifierSpec
    response: str
    reference: str | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class CheckerPool:
    """`workers` processes, each driven by a thread of this process that hands it one check and waits at most
    `timeout` seconds for the answer; past it the process is killed and a fresh one started.

    A worker is a fresh interpreter (subprocess), not a fork: it inherits none of the server's threads (torch's,
    the event loop's) and re-runs none of its main module, as multiprocessing's spawn and forkserver would."""

    STOP = object()

    def __init__(self, specs: list[VerifierSpec], workers: int, timeout: float):
        self.specs, self.timeout = specs, timeout
        self._queue = FairQueue()
        self._slots = [threading.Thread(target=self._serve_slot, name=f"rewardserve-verifier-{i}", daemon=True)
                       for i in range(workers)]
        self._started = threading.Barrier(workers + 1)
        self._startup_error: str | None = None
        self._processes: set = set()  # every live worker process, so close() can end them all

    def start(self) -> None:
        """Starts every worker and waits until each has loaded its checkers (a few seconds: sympy)."""
        for slot in self._slots:
            slot.start()
        self._started.wait()
        if self._startup_error:
            raise RuntimeError(self._startup_error)

    def _spawn(self):
        ours, theirs = socket.socketpair()
        specs = json.dumps([[spec.name, spec.kind, spec.option] for spec in self.specs])
        process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno()), specs],
                                   pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        connection = Connection(ours.detach())
        self._processes.add(process)
        try:
            if not connection.poll(120) or connection.recv() != "ready":
                raise EOFError("no answer within 120 s")
        except (EOFError, OSError) as error:
            process.kill()
            process.wait()
            self._processes.discard(process)
            raise RuntimeError(f"a verifier worker did not start ({error}; exit code {process.poll()})") from None
        return process, connection

    def _serve_slot(self) -> None:
        try:
            worker = self._spawn()
        except RuntimeError as error:
            self._startup_error = f"the verifier workers could not start: {error}"
            self._started.wait()
            return
        self._started.wait()
        while True:
            job = self._queue.get()
            if job is self.STOP:
                self._retire(worker, politely=True)
                return
            if job.future.cancelled():  # its client has gone
                continue
            began = time.perf_counter()
            outcome = self._one_check(job, worker)
            elapsed = time.perf_counter() - began
            gone = outcome is None
            if gone:  # past the limit, or the process died: the answer first, then a fresh worker
                outcome = ("ok", Check("timeout", 0.0)) if elapsed >= self.timeout else \
                    ("error", "the checker's process died while checking this item")
            metrics.VERIFIER_CHECK_SECONDS.labels(job.spec.name).observe(elapsed)
            if outcome[0] == "error":  # a failed check; the service counts every verdict it answers
                metrics.VERIFIER_CHECKS.labels(job.spec.name, "error").inc()
            job.loop.call_soon_threadsafe(_settle, job.future, outcome)
            if gone:
                self._retire(worker)
                worker = self._respawn()

    def _respawn(self):
        while True:
            try:
                return self._spawn()
            except RuntimeError as error:  # keep the slot: try again shortly
                log.error("verifier worker: %s; trying again in 1 s", error)
                time.sleep(1)

    def _retire(self, worker, politely: bool = False) -> None:
        process, connection = worker
        if politely:
            with contextlib.suppress(OSError):
                connection.send(None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        if process.poll() is None:
            process.kill()
            process.wait()
        connection.close()
        self._processes.discard(process)

    def _one_check(self, job: _Job, worker):
        """("ok", Check) or ("error", message); None when the worker is past its limit or gone."""
        _, connection = worker
        try:
            connection.send((self.specs.index(job.spec), job.response, job.reference))
            if connection.poll(self.timeout):
                answer = connection.recv()
                return ("ok", Check(*answer[1:])) if answer[0] == "ok" else answer
        except (EOFError, OSError, ValueError, TypeError):  # a closed pipe, a garbled answer
            pass
        return None

    def check(self, spec: VerifierSpec, pairs: list[tuple[str, str | None]], request: object
              ) -> list[asyncio.Future]:
        """One future per (response, reference), resolved with a `Check` or failed with `CheckFailed`."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(spec, response, reference, loop.create_future(), loop) for response, reference in pairs]
        self._queue.put_all(request, jobs)
        return [job.future for job in jobs]

    def close(self) -> None:
        self._queue.put_all(self.STOP, [self.STOP] * len(self._slots))
        for slot in self._slots:
            slot.join(6)
        for process in list(self._processes):  # a slot still busy (a check near its limit): its worker ends now
            process.kill()
            process.wait()


def _settle(future: asyncio.Future, outcome: tuple) -> None:
    if future.cancelled():
        return
    status, value = outcome
    if status == "ok":
        future.set_result(value)
    else:
        future.set_exception(CheckFailed(value))


def checker_version(spec: VerifierSpec) -> str:
    """What the checks depend on, hashed: the spec, and math-verify's release or the own checker's file (read,
    never imported here)."""
    import hashlib
    import importlib.metadata
    import importlib.util

    depends = f"{spec.kind}:{spec.option}"
    if spec.kind == "math":
        depends += ":math-verify " + importlib.metadata.version("math-verify")
    if spec.kind == "python":
        found = importlib.util.find_spec(spec.option.partition(":")[0])
        if found is None or not found.origin:
            raise ValueError(f"--verifier {spec.name}: no module {spec.option.partition(':')[0]!r} on the path")
        depends += ":" + hashlib.sha256(open(found.origin, "rb").read()).hexdigest()
    return hashlib.sha256(depends.encode()).hexdigest()[:12]


def default_workers() -> int:
    """Half the cores, at least one and at most 8: the checks share the machine with the reward models."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


if __name__ == "__main__":  # a worker: run with the package's own module, not this copy named __main__
    from rewardserve.server import verifiers

    verifiers.worker_main(int(sys.argv[1]), [verifiers.VerifierSpec(*spec) for spec in json.loads(sys.argv[2])])
