"""Which layers share a compiled program (builder/layer_programs.py)."""

from __future__ import annotations

import torch
from torch import nn

from llmc.builder.layer_programs import layer_signature, max_calls, plan_programs


def test_identical_layers_take_one_program_within_the_call_bound() -> None:
    plan = plan_programs(["a"] * 30, most_calls=7)
    assert len(plan.programs) == 1 and plan.calls <= 7
    assert sum(size for _, size in plan.runs) == 30 and plan.order == [0] * len(plan.runs)
    # The one program serves every run: the embedding runs eagerly and the logits get a program,
    # each counted as a call.
    assert plan.embed_apart and plan.logits_apart and plan.calls == len(plan.runs) + 2


def test_a_small_model_keeps_one_program_and_a_large_one_gets_more_calls() -> None:
    assert max_calls(96 << 20) == 1  # SmolLM2's 96 MB: one program, as one step is ~4 ms
    assert max_calls(2 << 30) > 10
    assert plan_programs(["a"] * 30, max_calls(96 << 20)).runs == [(0, 30)]


def test_alternating_forms_share_a_program_of_their_period() -> None:
    """Sliding and full attention in turn: runs of one period are all alike."""
    pattern = list("01" * 30)
    plan = plan_programs(pattern, most_calls=64)
    assert plan.runs == [(i, 2) for i in range(0, 60, 2)] and len(plan.programs) == 1
    # A Q4_K_M mix at 3B (some layers keep v_proj and down_proj in q6k): sharing does not pay
    # for the extra programs, nor where too few calls are allowed.
    mix = list("1110010010010010010010011111")
    assert plan_programs(mix, most_calls=30).runs == [(0, 28)]
    assert plan_programs(pattern, most_calls=3).runs == [(0, 60)]


def test_the_users_run_length_wins() -> None:
    plan = plan_programs(["a"] * 10, most_calls=1, layers_per_program=4)
    assert plan.runs == [(0, 4), (4, 4), (8, 2)] and plan.order == [0, 0, 1]


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
