"""Which decoder layers share a compiled program, and which process compiles each program.

Compiling a program has a large fixed cost besides its layers' own: AOTInductor's C++ wrapper
alone takes ~8 s of g++ however few layers it runs, and each layer adds ~0.6 s of lowering and
kernel code (SmolLM2 on a 2-core Xeon, docs/BENCHMARKS.md). Most models repeat one layer form, so
one program of a few layers, called once per run of layers with that run's own tensors, computes
the whole stack for a fraction of the compile; a model whose layers alternate forms (a Q4_K_M mix
keeping some layers' v_proj and down_proj in q6k, sliding and full attention) gets one program
per distinct run. Programs compile at the same time in separate processes where there are cores
for them (`schedule`), so the plan of least compile is the one of least *makespan*.

Calls are not free either: each call of a program beyond the first costs a step ~13 µs at batch
1 (SmolLM2 on a 2-core Xeon, docs/BENCHMARKS.md). The first run's program embeds the token ids
itself: where it serves other runs too, it takes the ids and a flag beside its input and selects
the embedding where the flag is set, a gather of B rows each of its calls pays (an eager embedding
cost ~140-250 µs instead: its dozen eager ops find the caches cold after a program), unless its
format's lookup is slow to compile (a K-quant's: `select_embed`), when the embedding runs eagerly. The logits
end the last run's program where no other run shares it; where others do, it takes a flag and
computes them by a conditional in the last run's call (the others allocate their shape and write
nothing; eager logits cost ~200 µs instead, for the same reason as the eager embedding); a plan
may also give the last run a program of its own. So that cost is bounded to 1 % of the step's
time, estimated from the bytes of weights a step reads: a small model (SmolLM2's 96 MB, a ~4 ms
step) may add two calls, one program of 10 layers serving all three runs, and a large model,
whose steps are long, a program per layer form (a 3B Q4_K_M mix: two 1-layer programs called 28
times). Among the partitions into runs of equal length (the last one shorter),
with or without the last run apart, within that bound, the one of least estimated compile wins;
`llmc build --layers-per-program` chooses the runs' length instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass

import msgspec
import torch
from torch import nn

# A program's fixed compile cost (its C++ wrapper, g++ and Inductor's setup: ~10 s) in units of
# one layer's (~0.6 s), measured on SmolLM2's layers on 2 cores (docs/BENCHMARKS.md).
PROGRAM_COST_IN_LAYERS = 16
# How much later than this process a compile worker starts compiling, in layer units: it is
# spawned before this process rebuilds the model, so its imports overlap that, and it began
# compiling ~1.5 s after this process did (SmolLM2's default build on a 2-core EPYC, ~0.9 s a
# layer there; docs/BENCHMARKS.md).
WORKER_COST_IN_LAYERS = 2
# What one more call of a compiled program costs a step at batch 1: ~13 µs per extra call,
# the slope of the step's time over 3 to 31 calls (SmolLM2, 2-core Xeon, docs/BENCHMARKS.md),
# rounded up.
CALL_SECONDS = 15e-6
# What a shared first program's embedding by select costs each call of it beyond the first run's
# (a compiled gather of B rows and a select, whose result the other runs discard): an estimate.
SELECT_EMBED_SECONDS = 3e-6
# What a shared last program's logits by a conditional cost each call of it beyond the last run's
# (the unset branch allocates the logits' shape and writes nothing): 0.7-0.8 µs measured per call
# of a small program with and without it, batch 1 to 64 (docs/BENCHMARKS.md), rounded up.
SELECT_LOGITS_SECONDS = 1e-6
# What an eager embedding between programs costs a step: 180-250 µs measured in the step's sequence
# on the Xeon, ~140 µs on the EPYC (24-43 µs alone; the caches are cold after a program).
EAGER_EMBED_SECONDS = 250e-6
# What the final norm and logits cost a step run eagerly after the last program (where that
# program serves other runs too and does not compute them by a flag) rather than inside it:
# 190-220 µs measured on SmolLM2 on the 2-core EPYC against the same program computing them by its
# flag (the eager dispatch finds its code and data evicted by the weights the step streamed;
# docs/BENCHMARKS.md).
EAGER_LOGITS_SECONDS = 200e-6
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
    # Where the first run's program serves others: it embeds by a select (else eagerly, before it).
    select_embed: bool = True
    # Where the last run's program serves others: it computes the logits where a flag beside its
    # input says (a conditional; else they run eagerly, after it).
    select_logits: bool = True

    @property
    def logits_apart(self) -> bool:
        """Whether the last run's program serves other runs too, so that it cannot simply end
        with the logits: it computes them by a conditional (`logits_select`), or they run eagerly."""
        return self.order.count(self.order[-1]) > 1

    @property
    def logits_select(self) -> bool:
        """Whether the last run's program, serving others too, computes the logits where a flag says."""
        return self.logits_apart and self.select_logits

    @property
    def eager_logits(self) -> bool:
        """Whether the final norm and the logits run eagerly, after the last run's program."""
        return self.logits_apart and not self.select_logits

    @property
    def first_shared(self) -> bool:
        """Whether the first run's program serves other runs too."""
        return self.order.count(self.order[0]) > 1

    @property
    def embed_select(self) -> bool:
        """Whether the first run's program embeds the ids by a select beside its input."""
        return self.first_shared and self.select_embed

    @property
    def embed_apart(self) -> bool:
        """Whether the embedding runs eagerly before the first run's program."""
        return self.first_shared and not self.select_embed

    @property
    def calls(self) -> int:
        """Calls per step, counting the eager embedding and the eager logits as one each."""
        return len(self.runs) + self.eager_logits + self.embed_apart

    @property
    def call_seconds(self) -> float:
        """What the plan's calls, selects and eager ends cost a step beyond one program's."""
        selects = (self.order.count(self.order[0]) - 1) * SELECT_EMBED_SECONDS if self.embed_select else 0.0
        if self.logits_select:
            selects += (self.order.count(self.order[-1]) - 1) * SELECT_LOGITS_SECONDS
        eager = self.embed_apart * EAGER_EMBED_SECONDS + self.eager_logits * EAGER_LOGITS_SECONDS
        return (len(self.runs) - 1) * CALL_SECONDS + selects + eager

    def program_costs(self) -> list[int]:
        """Each program's estimated compile cost in layer units."""
        return [PROGRAM_COST_IN_LAYERS + self.runs[run][1] for run in self.programs]


def call_budget(weight_bytes: int) -> float:
    """The seconds of calls per step that stay within CALL_OVERHEAD_SHARE of a step reading
    `weight_bytes` of weights."""
    return CALL_OVERHEAD_SHARE * weight_bytes / WEIGHT_BYTES_PER_SECOND


def schedule(costs: list[int], processes: int) -> list[list[int]]:
    """Jobs of these costs spread over `processes` (the first is this one, the others workers that
    each cost WORKER_COST_IN_LAYERS to start), the longest first onto the process that would end it
    soonest: the job indices of each process, the first list this process's."""
    bins: list[list[int]] = [[] for _ in range(max(1, processes))]
    loads = [0] + [WORKER_COST_IN_LAYERS] * (len(bins) - 1)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        target = min(range(len(bins)), key=lambda b: (loads[b] + costs[job], b))
        bins[target].append(job)
        loads[target] += costs[job]
    return bins


def makespan(costs: list[int], bins: list[list[int]]) -> int:
    """When the last process of `schedule`'s `bins` ends, in layer units."""
    ends = [sum(costs[j] for j in jobs) + (WORKER_COST_IN_LAYERS if i else 0) for i, jobs in enumerate(bins) if jobs]
    return max(ends, default=0)


def plan_programs(
    signatures: list[Hashable],
    budget_seconds: float,
    layers_per_program: int | None = None,
    processes: int = 1,
    select_embed: bool = True,
    select_logits: bool = True,
) -> ProgramPlan:
    """Partition layers of these forms (layer_signature) into runs of equal length (the last one
    may be shorter), the last run with a program of its own or not, whose calls cost a step at
    most `budget_seconds` (call_budget), of least estimated compile on `processes` processes; or
    into runs of `layers_per_program` layers where the user chose (`--layers-per-program`).
    `select_embed`, `select_logits`: whether a shared first program may embed by a select, a shared
    last one compute the logits by a conditional (ProgramPlan)."""
    count = len(signatures)
    if count == 0:
        raise ValueError("a model without layers has no programs")
    lengths = [min(layers_per_program, count)] if layers_per_program else range(1, count + 1)
    best: tuple[tuple[int, float], ProgramPlan] | None = None
    for length in lengths:
        runs = [(first, min(length, count - first)) for first in range(0, count, length)]
        shared = _plan(signatures, runs, False, select_embed, select_logits)
        apart = _plan(signatures, runs, True, select_embed, select_logits)
        for plan in (shared,) if apart == shared else (shared, apart):  # equal: the last run's is its own anyway
            if plan.call_seconds > budget_seconds and not layers_per_program and length != count:
                continue
            costs = plan.program_costs()
            cost = makespan(costs, schedule(costs, processes))
            if best is None or (cost, plan.call_seconds) < best[0]:
                best = ((cost, plan.call_seconds), plan)
    assert best is not None  # the whole stack as one run always qualifies
    return best[1]


def _plan(
    signatures: list[Hashable], runs: list[tuple[int, int]], last_apart: bool, select_embed: bool, select_logits: bool
) -> ProgramPlan:
    """The plan of these runs: runs of equal forms share a program, except (with `last_apart`)
    the last run, whose program then ends with the logits."""
    keys: dict[tuple[Hashable, ...], int] = {}
    order: list[int] = []
    programs: list[int] = []
    for i, (first, size) in enumerate(runs):
        key = tuple(signatures[first : first + size])
        if last_apart and i == len(runs) - 1:
            key = (*key, "the last run's own program")
        if key not in keys:
            keys[key] = len(programs)
            programs.append(i)
        order.append(keys[key])
    return ProgramPlan(runs, order, programs, select_embed, select_logits)


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
