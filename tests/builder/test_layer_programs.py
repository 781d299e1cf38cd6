"""Which layers share a compiled program (builder/layer_programs.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmc.builder.layer_programs import (
    CALL_SECONDS,
    PROGRAM_COST_IN_LAYERS,
    WORKER_COST_IN_LAYERS,
    call_budget,
    layer_signature,
    makespan,
    plan_programs,
    schedule,
)

# Enough call time for any plan of these tests' layers.
GENEROUS = 1.0


def test_identical_layers_take_one_program_within_the_call_bound() -> None:
    plan = plan_programs(["a"] * 30, budget_seconds=GENEROUS)
    assert len(plan.programs) == 1 and plan.calls > 1
    assert sum(size for _, size in plan.runs) == 30 and plan.order == [0] * len(plan.runs)
    # The one program serves every run: it embeds the ids by a select and computes the logits by a
    # conditional, so that a step is its calls alone.
    assert plan.embed_select and plan.logits_select and not plan.eager_logits and plan.calls == len(plan.runs)
    # Without the conditional the logits run eagerly, counted as a call.
    eager = plan_programs(["a"] * 30, budget_seconds=GENEROUS, select_logits=False)
    assert eager.eager_logits and not eager.logits_select and eager.calls == len(eager.runs) + 1


def test_a_small_model_keeps_one_program_and_a_large_one_gets_more_calls() -> None:
    # SmolLM2's 96 MB, a step of ~4 ms: two more calls fit in its 1 %, so one program of a third
    # of the layers serves all three runs, embedding by a select and computing the logits by a
    # conditional: one program to compile, on one process or two.
    small = call_budget(96 << 20)
    assert CALL_SECONDS < small < 4 * CALL_SECONDS
    assert call_budget(2 << 30) > 40 * CALL_SECONDS
    for processes in (1, 2):
        plan = plan_programs(["a"] * 30, small, processes=processes)
        assert plan.runs == [(0, 10), (10, 10), (20, 10)] and plan.order == [0, 0, 0], processes
        assert plan.embed_select and plan.logits_select and plan.calls == 3 and plan.call_seconds <= small
    # Without the conditional, eager logits (~100 µs) do not fit: one process compiles the whole
    # stack; two compile two programs at once, one serving the first two runs (it embeds by a
    # select) and the last run's own ending with the logits.
    assert plan_programs(["a"] * 30, small, select_logits=False).runs == [(0, 30)]
    split = plan_programs(["a"] * 30, small, processes=2, select_logits=False)
    assert len(split.runs) == 3 and split.order == [0, 0, 1] and split.embed_select and not split.logits_apart
    assert split.runs[0][1] == split.runs[1][1] > split.runs[2][1]
    assert split.call_seconds <= small


def test_alternating_forms_share_a_program_of_their_period() -> None:
    """Sliding and full attention in turn: runs of one period are all alike."""
    pattern = list("01" * 30)
    plan = plan_programs(pattern, GENEROUS)
    assert plan.runs == [(i, 2) for i in range(0, 60, 2)] and len(plan.programs) == 1
    # A Q4_K_M mix at 3B (some layers keep v_proj and down_proj in q6k): a program per form, one
    # layer each, compiles for less than one of the 28 layers, within the call time a 3B step
    # allows; on two processes the two programs compile at once.
    mix = list("1110010010010010010010011111")
    three_b = call_budget(1918 << 20)
    for processes in (1, 2):
        plan = plan_programs(mix, three_b, processes=processes)
        assert plan.runs == [(i, 1) for i in range(28)] and len(plan.programs) == 2, processes
        assert plan.logits_select and plan.embed_select and plan.call_seconds <= three_b
        # Its q6k embedding is slow to compile into a program: looked up eagerly instead.
        eager = plan_programs(mix, three_b, processes=processes, select_embed=False)
        assert eager.runs == plan.runs and eager.embed_apart and not eager.embed_select
        assert eager.calls == plan.calls + 1 and eager.call_seconds <= three_b
    costs = plan.program_costs()
    assert makespan(costs, schedule(costs, 2)) < makespan(costs, schedule(costs, 1))
    # Time for two more calls: one program serves three runs of a third of the layers.
    assert plan_programs(pattern, 3 * CALL_SECONDS).runs == [(0, 20), (20, 20), (40, 20)]
    # Without the conditional: one program serves two long runs, the short last run has its own.
    assert plan_programs(pattern, 3 * CALL_SECONDS, select_logits=False).runs == [(0, 28), (28, 28), (56, 4)]
    # Too little call time: one program.
    assert plan_programs(pattern, CALL_SECONDS).runs == [(0, 60)]


def test_the_users_run_length_wins() -> None:
    plan = plan_programs(["a"] * 10, 0.0, layers_per_program=4)
    assert plan.runs == [(0, 4), (4, 4), (8, 2)] and plan.order == [0, 0, 1]


def test_schedule_spreads_the_longest_jobs_first_and_pays_for_workers() -> None:
    # One process: everything here.
    assert schedule([5, 9, 3], 1) == [[1, 0, 2]]
    # Two: a worker pays its start, so a short job stays here.
    assert schedule([1, 1], 2) == [[0, 1], []]
    bins = schedule([30, 30, 16], 2)
    assert sorted(j for b in bins for j in b) == [0, 1, 2] and all(bins)
    costs = [30, 30, 16]
    assert makespan(costs, bins) == max(
        sum(costs[j] for j in bins[0]), WORKER_COST_IN_LAYERS + sum(costs[j] for j in bins[1])
    )
    assert makespan(costs, bins) < sum(costs)
    # A plan's programs cost their fixed part and their layers.
    plan = plan_programs(["a"] * 4, GENEROUS, layers_per_program=2)
    assert plan.program_costs() == [PROGRAM_COST_IN_LAYERS + 2]


class _Layer(nn.Module):
    def __init__(self, size: int, window: int | None, shared: object) -> None:
        super().__init__()
        self.proj = nn.Linear(size, size)
        self.window = window
        self.shared = shared  # an object two layers hold: equal when it is the same one
        self.register_buffer("scale", torch.ones(size))


def test_signatures_compare_forms_not_values() -> None:
    shared = object()
    a, b = _Layer(8, None, shared), _Layer(8, None, shared)
    with torch.no_grad():
        b.proj.weight.add_(1)  # other values: the same program
    assert layer_signature(a) == layer_signature(b)
    assert layer_signature(a) != layer_signature(_Layer(8, 4, shared))  # an attribute differs
    assert layer_signature(a) != layer_signature(_Layer(16, None, shared))  # a shape differs
    assert layer_signature(a) != layer_signature(_Layer(8, None, object()))  # another object
    c = _Layer(8, None, shared)
    c.proj.weight.data = c.proj.weight.data.to(torch.bfloat16)
    assert layer_signature(a) != layer_signature(c)  # a dtype differs


def test_a_k_quant_lookup_stays_out_of_shared_programs() -> None:
    """A shared first program embeds by a select only where the table's lookup compiles quickly:
    floats and the legacy block formats, not the K-quants (builder/targets/cpu.py)."""
    from types import SimpleNamespace

    from llmc.builder.targets.cpu import _lookup_compiles_quickly
    from llmc.model.quant_linear import QuantEmbedding

    def model(table: nn.Module) -> Any:
        return SimpleNamespace(model=SimpleNamespace(embed_tokens=table))

    for fmt, quick in (("q8_0", True), ("q4_1", True), ("q4k", False), ("q6k", False)):
        assert _lookup_compiles_quickly(model(QuantEmbedding(fmt, 4, 256, torch.float32))) is quick, fmt
    assert _lookup_compiles_quickly(model(nn.Embedding(4, 8)))
