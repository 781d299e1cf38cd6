"""benchmarks/serving.py's reporting: the median of the repeated rounds, every repeat kept."""

from __future__ import annotations

from typing import Any

from llmc.benchmarks.serving import median_round, table


def _round(tok_s: float) -> dict[str, Any]:
    return {"server": "llmc", "clients": 16, "ok": 16, "tok_per_s": tok_s, "ttft_p50_s": 0.8, "ttft_p99_s": 0.9,
            "itl_p50_s": 0.02, "itl_p99_s": 0.1, "other_load_cores": 0.0, "attempt": 1, "requests": []}  # fmt: skip


def test_the_median_round_is_reported_with_every_repeat() -> None:
    chosen = median_round([_round(430.0), _round(470.0), _round(450.0)])
    assert chosen["tok_per_s"] == 450.0
    assert [r["tok_per_s"] for r in chosen["repeats"]] == [430.0, 470.0, 450.0]
    assert median_round([_round(2.0), _round(1.0)])["tok_per_s"] == 1.0  # even count: the lower middle
    assert median_round([_round(5.0)])["tok_per_s"] == 5.0
    line = table([{**chosen, "server": "llmc"}]).splitlines()[-1]
    assert "| 450.0 |" in line and line.endswith("| 430 / 470 / 450 | - |")
    line = table([{**chosen, "server": "llmc", "preemptions_so_far": 2}]).splitlines()[-1]
    assert line.endswith("| 430 / 470 / 450 | 2 |")  # a KV cache too small for the round shows
