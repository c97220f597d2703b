"""Answer checkers (server/verifiers.py): the verdicts of each kind on hand cases, and the worker pool that bounds
every check in time and keeps a checker's failure to its item."""
from __future__ import annotations

import asyncio
import re
import sys
import time

import pytest

from rewardserve.server.verifiers import CheckerPool, CheckFailed, FairQueue, VerifierSpec, run_check

MATH = VerifierSpec.parse("correct=math")

# (response, reference, verdict): equivalent forms, wrong answers, no answer, several boxed answers, malformed LaTeX
MATH_CASES = [
    ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),
    ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
    ("\\boxed{1/2}", "1/2", "correct"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", "correct"),
    ("\\boxed{2}", "2.0", "correct"),
    ("\\boxed{50\\%}", "0.5", "correct"),
    ("\\boxed{\\sqrt{4}}", "2", "correct"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", "correct"),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", "correct"),  # a set, in any order
    ("\\boxed{(0, 1]}", "(0,1]", "correct"),  # an interval
    ("\\boxed{[0, 1]}", "(0,1]", "wrong"),  # ... whose ends matter
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", "correct"),
    ("\\boxed{\\pi}", "\\pi", "correct"),
    ("\\boxed{3.14}", "\\pi", "wrong"),
    ("First \\boxed{3}, then \\boxed{5}.", "5", "correct"),  # several boxed answers: the last one counts
    ("First \\boxed{3}, then \\boxed{5}.", "3", "wrong"),
    ("The answer is 42.", "42", "correct"),  # a final-answer line
    ("Final answer: 42", "42", "correct"),
    ("Answer: -7", "-7", "correct"),
    ("The final answer is $\\frac{7}{2}$", "3.5", "correct"),
    ("Answer: 12 apples", "12", "correct"),
    ("Answer: 3/4", "\\frac{3}{4}", "correct"),
    ("Answer: 0.333", "1/3", "wrong"),
    ("I think it's 42", "42", "no_answer"),  # neither boxed nor a final-answer line
    ("so 5", "5", "no_answer"),
    ("", "1", "no_answer"),
    ("\\boxed{}", "1", "no_answer"),
    ("\\boxed{\\frac{1}{", "0.5", "wrong"),  # malformed LaTeX: read as far as it goes, never an error
    ("\\boxed{\\frac{1}{0}}", "1", "wrong"),
    ("\\boxed{7}", "8", "wrong"),
    ("\\boxed{1,000}", "1000", "correct"),
    ("\\boxed{10^{3}}", "1000", "correct"),
    ("\\boxed{2^{10}}", "1024", "correct"),
    ("\\boxed{-\\frac{1}{3}}", "-1/3", "correct"),
    ("\\boxed{\\frac{-1}{3}}", "-\\frac{1}{3}", "correct"),
    ("\\boxed{(1, 2)}", "(1,2)", "correct"),
    ("\\boxed{x = 5}", "5", "correct"),
    ("\\boxed{5}", "x=5", "correct"),
    ("\\boxed{\\infty}", "\\infty", "correct"),
    ("\\boxed{e}", "e", "correct"),
    ("\\boxed{\\sin(\\pi/2)}", "1", "correct"),
    ("\\boxed{\\text{yes}}", "yes", "correct"),
    ("Answer: 8 + 11", "19", "wrong"),  # a number is answered with a number, not the question's sum echoed
    ("\\boxed{3 \\times 4}", "12", "wrong"),
    ("\\boxed{26 - 22}", "4", "wrong"),
    ("Answer: 26 - 22 = 4", "4", "correct"),  # ... while a worked line ending in the number is an answer
]


@pytest.mark.parametrize("response, reference, verdict", MATH_CASES)
def test_math_verdicts(response, reference, verdict):
    check = run_check(MATH, response, reference, {})
    assert (check.verdict, check.score) == (verdict, float(verdict == "correct")), check
    assert (check.answer is None) == (verdict == "no_answer")


def test_math_reads_the_last_boxed_answer_and_says_what_it_read():
    check = run_check(MATH, "Try \\boxed{3}. No: \\boxed{\\frac{10}{4}}", "2.5", {})
    assert check == type(check)("correct", 1.0, "\\frac{10}{4}")


def test_lenient_math_takes_the_last_line():
    lenient = VerifierSpec.parse("m=math:lenient")
    assert run_check(lenient, "3 + 4 = 7", "7", {}).verdict == "correct"
    assert run_check(lenient, "so 5", "5", {}).verdict == "correct"
    assert run_check(lenient, "so 6", "5", {}).verdict == "wrong"


@pytest.mark.parametrize("spec, response, reference, score", [
    ("same=exact", "Paris", "paris", 1.0),
    ("same=exact", "  The   Eiffel Tower. ", "the eiffel tower", 1.0),
    ("same=exact", "Ｐａｒｉｓ", "Paris", 1.0),  # Unicode compatibility forms
    ("same=exact", "Paris, France", "Paris", 0.0),
    ("same=exact", "", "Paris", 0.0),
    ("fmt=regex:\\\\boxed\\{.+\\}", "so \\boxed{3}", None, 1.0),
    ("fmt=regex:\\\\boxed\\{.+\\}", "so 3", None, 0.0),
    ("fmt=regex:^<think>.*</think>", "<think>a</think> 3", None, 1.0),
    ("fmt=regex:^<think>.*</think>", "3 <think>a</think>", None, 0.0),
])
def test_exact_and_regex(spec, response, reference, score):
    assert run_check(VerifierSpec.parse(spec), response, reference, {}).score == score


@pytest.mark.parametrize("spec, message", [
    ("correct", "write NAME=KIND[:OPTION]"),
    ("correct=maths", "KIND one of math, exact, regex, python"),
    ("fmt=regex:(", "the pattern does not compile"),
    ("fmt=regex", "regex needs a pattern"),
    ("own=python:justamodule", "python takes MODULE:FUNCTION"),
    ("correct=math:strict", "math takes no option or `lenient`"),
])
def test_a_bad_spec_says_how_to_write_it(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        VerifierSpec.parse(spec)


def test_the_fair_queue_takes_one_job_of_each_request_in_turn():
    queue = FairQueue()
    queue.put_all("flood", [f"flood {i}" for i in range(5)])
    queue.put_all("small", ["small 0", "small 1"])
    assert [queue.get() for _ in range(7)] == ["flood 0", "small 0", "flood 1", "small 1", "flood 2", "flood 3",
                                               "flood 4"]


# -- the pool: real worker processes ------------------------------------------------------------------------------
OWN_CHECKER = '''
def score(response, reference):
    if response == "crash":
        raise ValueError("cannot read " + response)
    if response == "exit":
        import os
        os._exit(3)
    return {"score": float(len(response) == int(reference)), "answer": str(len(response))}
'''

HOSTILE = {
    "deeply nested LaTeX": "\\boxed{" + "\\frac{1}{" * 3000 + "1" + "}" * 3000 + "}",
    "an expression sympy cannot finish": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "1 MB with no answer": "x" * 1_000_000,
    "1 MB of nested brackets": "\\boxed{" + "(" * 500_000 + ")" * 500_000 + "}",
}


@pytest.fixture(scope="module")
def own_checker_on_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own_checker")
    (folder / "own_checks.py").write_text(OWN_CHECKER)
    sys.path.insert(0, str(folder))
    import os
    os.environ["PYTHONPATH"] = f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # the workers' path too
    yield
    sys.path.remove(str(folder))


def run(coroutine):
    return asyncio.run(coroutine)


def test_hostile_answers_are_timeouts_within_the_limit_and_a_small_request_is_not_kept_waiting(own_checker_on_path):
    """Two workers, a 1 s limit: every hostile answer is answered within the limit (plus the worker's restart),
    and a request of ordinary answers sent after them is answered first, not after all of them."""
    specs = [MATH, VerifierSpec.parse("slow=regex:(a+)+$")]

    async def scenario():
        pool = CheckerPool(specs, workers=2, timeout=1.0)
        pool.start()
        try:
            began = time.perf_counter()
            hostile = pool.check(MATH, [(text, "1") for text in HOSTILE.values()] * 2, "attacker")
            backtracking = pool.check(specs[1], [("a" * 40 + "b", None)] * 2, "attacker")
            await asyncio.sleep(0.05)
            ordinary = pool.check(MATH, [("\\boxed{2}", "2"), ("Answer: 3", "4")], "user")
            ordinary_checks = await asyncio.gather(*ordinary)
            ordinary_seconds = time.perf_counter() - began
            hostile_checks = await asyncio.gather(*hostile, *backtracking)
            return ordinary_checks, ordinary_seconds, hostile_checks, time.perf_counter() - began
        finally:
            pool.close()

    ordinary, ordinary_seconds, hostile, total = run(scenario())
    assert [check.verdict for check in ordinary] == ["correct", "wrong"]
    # one request in turn with the attacker's: behind at most two of its checks per worker, not all ten
    assert ordinary_seconds < 4.0, ordinary_seconds
    verdicts = [check.verdict for check in hostile]
    assert set(verdicts) <= {"timeout", "no_answer", "wrong"} and verdicts[-2:] == ["timeout", "timeout"], verdicts
    assert total < 10 * 1.0 / 2 + 6, total  # ten checks of at most 1 s on two workers, with restarts


def test_a_crash_in_a_checker_is_that_item_s_error_and_the_others_are_answered(own_checker_on_path):
    own = VerifierSpec.parse("own=python:own_checks:score")

    async def scenario():
        pool = CheckerPool([own], workers=1, timeout=5.0)
        pool.start()
        try:
            futures = pool.check(own, [("abc", "3"), ("crash", "1"), ("exit", "1"), ("ab", "3")], "request")
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            pool.close()

    ok, crashed, died, wrong = run(scenario())
    assert (ok.verdict, ok.score, ok.answer) == ("correct", 1.0, "3")
    assert isinstance(crashed, CheckFailed) and "ValueError: cannot read crash" in str(crashed)
    assert isinstance(died, CheckFailed) and "process died" in str(died)
    assert (wrong.verdict, wrong.score) == ("wrong", 0.0)  # answered by the worker started after the one that died
