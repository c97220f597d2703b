"""Workload G as specified: 64 prompts of W-like length, 8 responses each, the same every time."""
from __future__ import annotations

import os

from rewardserve.trainer.bench.common import workload_g


def test_workload_g_is_64_groups_of_8_responses_to_one_prompt():
    groups = workload_g()
    assert len(groups) == 64 and all(len(group) == 8 for group in groups)
    prompts = [len(os.path.commonprefix(group)) for group in groups]
    assert all(32 <= p <= 2048 for p in prompts)
    responses = [len(s) - p for group, p in zip(groups, prompts) for s in group]
    assert all(16 <= r <= 1024 for r in responses)
    assert 400 < sum(prompts) / 64 < 800 and 120 < sum(responses) / len(responses) < 220  # e^(ln 500), e^(ln 150)
    assert workload_g(3) == groups[:3] and workload_g() == groups
