"""Runs drawn side by side (how docs/images/prm-ppo.png is made)."""
from __future__ import annotations

import json

import pytest

from rewardserve.trainer.tracking import main


def test_two_runs_are_drawn_side_by_side(tmp_path):
    for name, rise in (("a", 0.1), ("b", 0.2)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"step": s, "kl": rise * s, "reward": s})
                                                        + "\n" for s in range(1, 6)))
    out = tmp_path / "plot.png"
    main([f"a={tmp_path / 'a.jsonl'}", f"b={tmp_path / 'b.jsonl'}", "--keys", "kl,reward", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="nothing plotted"):
        main([f"a={tmp_path / 'a.jsonl'}", "--keys", "missing", "--out", str(tmp_path / "none.png")])
