"""Which decoder layers share a compiled program.

Compiling a program has a large fixed cost besides its layers' own: AOTInductor's C++ wrapper
alone takes ~8 s of g++ however few layers it runs, and each layer adds ~0.6 s of lowering and
kernel code (SmolLM2 on a 2-core Xeon, docs/BENCHMARKS.md). Most models repeat one layer form, so
one program of a few layers, called once per run of layers with that run's own tensors, computes
the whole stack for a fraction of the compile; a model whose layers alternate forms (a Q4_K_M mix
keeping some layers' v_proj and down_proj in q6k, sliding and full attention) gets one program
per distinct run.

Calls are not free either. AOTInductor's run alone takes ~4 µs, but in a step each boundary
between programs measured ~50 µs (SmolLM2, batch 1: six runs of 5 layers and a logits program
made the step 8 % slower than one program, 0.35 ms of 4.1, docs/BENCHMARKS.md). So the number of
calls per step is bounded to keep their cost under 1 % of the step's time, estimated from the
bytes of weights a step reads: a small model (SmolLM2's 96 MB) keeps one program, and the saving
is for large models, whose steps are long (a 3B model's allows ~15 calls). Among the partitions
into runs of equal length (the last one shorter) within that bound, the one of least estimated
compile wins; `llmc build --layers-per-program` chooses the runs' length instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from dataclasses import dataclass

import msgspec
import torch
from torch import nn

# A program's fixed compile cost (its C++ wrapper, g++ and Inductor's setup: ~10 s) in units of
# one layer's (~0.6 s), measured on SmolLM2's layers on 2 cores (docs/BENCHMARKS.md).
PROGRAM_COST_IN_LAYERS = 16
# What one more call of a compiled program costs a step: measured ~50 µs per boundary on a 2-core
# Xeon (module doc); the run itself is ~4 µs, the rest is the step's work around it.
CALL_SECONDS = 50e-6
# The share of a step's time the calls may take.
CALL_OVERHEAD_SHARE = 0.01
# A high estimate of how fast a CPU streams weights during a step (a many-channel server's
# memory): it makes the estimated step short, which errs towards fewer, longer programs.
WEIGHT_BYTES_PER_SECOND = 25e9


@dataclass(frozen=True)
class ProgramPlan:
    """Runs of layers, in order, and the program that computes each."""

    runs: list[tuple[int, int]]  # (first layer, layers)
    order: list[int]  # the program of each run, an index into `programs`
    programs: list[int]  # the index of each program's first run (the one that is traced)

    @property
    def logits_apart(self) -> bool:
        """Whether the logits need a program of their own: the last run's program serves others."""
        return self.order.count(self.order[-1]) > 1

    @property
    def embed_apart(self) -> bool:
        """Whether the embedding runs eagerly: the first run's program serves others."""
        return self.order.count(self.order[0]) > 1

    @property
    def calls(self) -> int:
        """Calls per step, counting the eager embedding as one (it costs the step as one does)."""
        return len(self.runs) + self.logits_apart + self.embed_apart


def max_calls(weight_bytes: int) -> int:
    """The most program calls per step whose cost stays within CALL_OVERHEAD_SHARE of a step
    that reads `weight_bytes` of weights."""
    step_seconds = weight_bytes / WEIGHT_BYTES_PER_SECOND
    return max(1, math.floor(CALL_OVERHEAD_SHARE * step_seconds / CALL_SECONDS))


def plan_programs(signatures: list[Hashable], most_calls: int, layers_per_program: int | None = None) -> ProgramPlan:
    """Partition layers of these forms (layer_signature) into runs of equal length (the last one
    may be shorter) of least estimated compile cost, with at most `most_calls` calls per step; or
    into runs of `layers_per_program` layers where the user chose (`--layers-per-program`)."""
    count = len(signatures)
    if count == 0:
        raise ValueError("a model without layers has no programs")
    lengths = [min(layers_per_program, count)] if layers_per_program else range(1, count + 1)
    best: tuple[tuple[int, int], ProgramPlan] | None = None
    for length in lengths:
        runs = [(first, min(length, count - first)) for first in range(0, count, length)]
        keys: dict[tuple[Hashable, ...], int] = {}
        order: list[int] = []
        programs: list[int] = []
        for i, (first, size) in enumerate(runs):
            key = tuple(signatures[first : first + size])
            if key not in keys:
                keys[key] = len(programs)
                programs.append(i)
            order.append(keys[key])
        plan = ProgramPlan(runs, order, programs)
        if plan.calls > most_calls and not layers_per_program and length != count:
            continue
        compiled = len(keys) + plan.logits_apart  # the logits program: a program's fixed cost
        cost = PROGRAM_COST_IN_LAYERS * compiled + sum(len(key) for key in keys)
        if best is None or (cost, plan.calls) < best[0]:
            best = ((cost, plan.calls), plan)
    assert best is not None  # the whole stack as one run always qualifies
    return best[1]


def layer_signature(layer: nn.Module) -> Hashable:
    """What a traced layer's program depends on besides its own parameters and buffers (which the
    runtime hands each run by name): its modules' classes and attributes, and its tensors' shapes,
    dtypes and strides. Two layers of equal signatures trace to the same program. Values this
    cannot compare (objects, tensors that are not parameters or buffers) count as equal only when
    they are the same object, which two layers of one model share (a rope table, a matmul plan)."""
    items: list[Hashable] = []
    for name, module in layer.named_modules(remove_duplicate=False):
        items.append((name, type(module).__module__, type(module).__qualname__))
        for key, value in sorted(vars(module).items()):
            if key in ("_parameters", "_buffers"):
                items += [(name, key, k, _tensor_key(v)) for k, v in value.items()]
            elif key == "_modules":
                items += [(name, key, k, None) for k, v in value.items() if v is None]
            else:
                items.append((name, key, _value_key(value)))
    return tuple(items)


def _tensor_key(tensor: torch.Tensor | None) -> Hashable:
    if tensor is None:
        return None
    return ("tensor", tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype), tensor.requires_grad)


def _value_key(value: object) -> Hashable:
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return (type(value).__name__, str(value))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_value_key(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, tuple(sorted(repr(_value_key(v)) for v in value)))
    if isinstance(value, dict):
        if not value:
            return ("dict", ())
        return ("dict", tuple((_value_key(k), _value_key(v)) for k, v in value.items()))
    if isinstance(value, (torch.Tensor, nn.Module)):
        return ("object", id(value))  # a tensor not registered, a module not a child: the same one
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, _value_key(getattr(value, f.name))) for f in dataclasses.fields(value))
        return (type(value).__qualname__, fields)
    if isinstance(value, msgspec.Struct):
        return (type(value).__qualname__, _value_key(msgspec.structs.asdict(value)))
    return ("object", id(value))
