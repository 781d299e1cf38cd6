"""Which weight form serves which batch size on this host, measured rather than assumed.

A quantized weight has a small-batch form (llmc's kernel, torch's int4 kernel or an int4 pair,
kernels/cpu/qmatmul_cpu.py) and may keep a dense copy for big batches. Where the dense GEMM starts
to win depends on the CPU: on AVX-512 BF16 machines a bf16 copy wins from 8-32 rows, on AVX2-only
ones bf16 is emulated and makes batches slower (issue 25). So each host times the artifact's weight
shapes once, in every form it runs, at a few row counts, and derives a DensePlan: per small form
the row count from which its dense copy wins (or never: no copy is kept, which saves its memory),
and the copies' dtype (bf16 only where the CPU has native bf16, else f32).

The result depends on the artifact's weight shapes (not their values: speed does not depend on
them), the CPU, the thread count, torch and the kernel library loaded; it is cached under that key
in the user's cache ($LLMC_CACHE_DIR/autotune, private), written atomically and validated on read.
`llmc build` tunes for the build host, so that `llmc run` there starts without the pause;
`--no-autotune` takes `default_plan` instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import msgspec
import torch
import torch.nn.functional as F

from llmc import user_cache
from llmc.errors import InternalError
from llmc.kernels.cpu import cpu_kernels
from llmc.kernels.cpu.qmatmul_cpu import DEFAULT_PLAN, SMALL_FORMS, CpuQMatmul, DensePlan
from llmc.logs import get_logger
from llmc.quant.formats import stored_format

log = get_logger("llmc.engine")

# Activation row counts timed: one sequence, small decode batches, and the batch sizes where the
# measured switches lie on the machines seen so far (8 for pairs, 32 for int4 and the kernel).
ROWS = (1, 4, 8, 16, 32, 64)
# The whole measurement's wall-clock budget: it delays the first start of an artifact on a host
# (build hosts tune at build), so it stays a few seconds on the 2-core machines llmc targets. Past
# it the measurement stops and the defaults serve (and are cached: see tune).
BUDGET_S = 3.0
# Timed passes per (shape, form, rows); the minimum counts (the least disturbed by other processes).
REPEATS = 3
# Per shape, weights are timed in turn until their bf16 size reaches this, so that they stream
# from memory as in a decode step: one weight timed alone stays in cache and flatters the dense
# form (benchmarks/weight_forms.py). More than the L2 caches of the CPUs seen, bounded for time.
STREAM_BYTES = 16 << 20
# ...and at most this many weights per shape: preparing each for its kernel costs time too, and the
# small projections of a model (a few hundred KB each) would otherwise take dozens.
MAX_PER_SHAPE = 8
# A weight timed on its first rows keeps a multiple of this many: every form's row blocking (16).
_ROW_STEP = 64
# A dense copy costs memory (2 or 4 bytes per weight); it must beat the small form by this factor
# to be worth keeping, which also keeps timing noise on a loaded machine from flipping the choice.
MIN_GAIN = 1.1
# CPU flags (Linux names) of native bf16 matmuls; without them torch emulates bf16 GEMMs slowly.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
NO_DENSE = DensePlan(kernel=None, int4=None, pair=None)
_SCHEMA = 1  # of the cached document; another value is ignored
_MAX_CACHE_BYTES = 4096  # a cached plan is ~200 bytes: anything bigger is not ours
_CPUINFO = Path("/proc/cpuinfo")


def native_bf16(flags: frozenset[str]) -> bool:
    """Whether the CPU multiplies bf16 natively (else a bf16 dense copy is never chosen)."""
    return bool(flags & NATIVE_BF16_FLAGS)


def default_plan(flags: frozenset[str]) -> DensePlan:
    """The plan without measuring (`--no-autotune`, or a measurement over budget): the thresholds
    measured on an AVX-512 BF16 machine where bf16 is native; elsewhere no dense copies, which
    issue 25 measured faster on AVX2 than emulated bf16 copies, and which saves their memory."""
    return DEFAULT_PLAN if native_bf16(flags) else replace(NO_DENSE, dtype=torch.float32)


@dataclass(frozen=True)
class Tuning:
    """The plan the runtime takes and where it came from: measured, cached, defaults."""

    plan: DensePlan
    source: str
    timings_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        """For the engine's ready log and describe()."""
        return {
            "source": self.source,
            "dense_dtype": _DTYPE_NAMES.get(self.plan.dtype, str(self.plan.dtype)),
            "dense_from_rows": {form: self.plan.from_rows(form) for form in SMALL_FORMS},
        }


# ---- what the result depends on --------------------------------------------------------------


def shape_signature(tensors: Iterable[tuple[str, list[int]]]) -> list[tuple[str, int, int, int]]:
    """(format, rows, row bytes, count) of the distinct quantized weight shapes, sorted: the
    artifact's part of the cache key (its values do not change the timings)."""
    counts = Counter((fmt, shape[0], shape[1]) for fmt, shape in tensors)
    return sorted((fmt, rows, width, n) for (fmt, rows, width), n in counts.items())


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        for line in _CPUINFO.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(
    signature: list[tuple[str, int, int, int]], threads: int, kernel_isa: str | None, act_dtype: torch.dtype
) -> str:
    """The key of a measurement: the weight shapes, the CPU's model and flags, the thread count,
    torch, the kernel library loaded (its ISA and how it quantizes the K-quant forms'
    activations) and the activations' dtype."""
    parts = {
        "schema": _SCHEMA,
        "shapes": signature,
        "cpu": cpu_model(),
        "flags": sorted(cpu_kernels.effective_cpu_flags()),
        "threads": threads,
        "torch": torch.__version__,
        "kernel_isa": kernel_isa,
        "kquant_activations": cpu_kernels.kquant_activations() if kernel_isa is not None else None,
        "activations": str(act_dtype),
        "rows": ROWS,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ---- measuring -------------------------------------------------------------------------------


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls after one warm-up, in ms."""
    fn()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def _small_pass(modules: list[CpuQMatmul], x: torch.Tensor) -> None:
    for module in modules:
        module(x)


def _dense_pass(weights: list[torch.Tensor], x: torch.Tensor) -> None:
    for weight in weights:
        F.linear(x, weight)


def measure(
    groups: Iterable[tuple[float, Callable[[], list[CpuQMatmul]]]],
    dtypes: list[torch.dtype],
    act_dtype: torch.dtype,
    budget_s: float = BUDGET_S,
    repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, list[float]]] | None:
    """Per small form, the time in ms of the model's weights of that form at each of ROWS, in the
    small form ("small") and as dense GEMMs of each dtype: a sum over shape groups, each timed on
    a few of its weights (`groups`: (weights of that shape in the model, a function making the
    prepared modules to time)) and scaled to the group's count. None past `budget_s`."""
    deadline = clock() + budget_s
    totals: dict[str, dict[str, list[float]]] = {}
    for count, make in groups:
        if clock() > deadline:
            return None
        modules = make()
        if not modules or modules[0].form not in SMALL_FORMS:
            continue
        form = modules[0].form
        scale = count / len(modules)
        shapes = [(m.out_features, m.in_features) for m in modules]
        dense = {dt: [torch.randn(n, k).to(dt) for n, k in shapes] for dt in dtypes}
        entry = totals.setdefault(form, {name: [0.0] * len(ROWS) for name in ["small", *map(_name, dtypes)]})
        for i, rows in enumerate(ROWS):
            x = torch.randn(rows, shapes[0][1]).to(act_dtype)
            entry["small"][i] += scale * _best_ms(partial(_small_pass, modules, x), repeats)
            for dt, weights in dense.items():
                if clock() > deadline:
                    return None
                entry[_name(dt)][i] += scale * _best_ms(partial(_dense_pass, weights, x.to(dt)), repeats)
            if clock() > deadline:
                return None
    return totals


def _name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def decide(timings: Mapping[str, Mapping[str, list[float]]], flags: frozenset[str]) -> DensePlan:
    """The plan the timings call for: per form, the smallest of ROWS from which the dense GEMM
    beats the small form by MIN_GAIN at that and every larger row count (None: never); bf16
    copies where the CPU has native bf16 unless f32 is faster by MIN_GAIN at the most rows, else
    f32 copies. A bf16 timing on a CPU without native bf16 is ignored."""
    candidates = [name for name in ("bf16", "f32") if name != "bf16" or native_bf16(flags)]
    measured = [name for name in candidates if all(name in forms for forms in timings.values())]
    if not timings or not measured:
        return default_plan(flags)
    dtype_name = measured[0]
    if len(measured) > 1:
        at_most = {name: sum(forms[name][-1] for forms in timings.values()) for name in measured}
        if at_most["f32"] * MIN_GAIN < at_most["bf16"]:
            dtype_name = "f32"
    thresholds: dict[str, int | None] = dict.fromkeys(SMALL_FORMS)
    for form, times in timings.items():
        small, dense = times["small"], times[dtype_name]
        wins = [d * MIN_GAIN < s for s, d in zip(small, dense, strict=True)]
        threshold = None
        for i in reversed(range(len(ROWS))):
            if not wins[i]:
                break
            threshold = ROWS[i]
        thresholds[form] = threshold
    return DensePlan(**thresholds, dtype=DTYPES[dtype_name])


def fit(plan: DensePlan, weights: Mapping[str, int], max_rows: int, memory: int | None, share: float) -> DensePlan:
    """`plan` cut to what the server runs and the memory allows: no copy for a form whose dense
    threshold is above `max_rows` (the most rows one step multiplies: it would never be used), and
    none at all when the copies kept (`weights`: number of weights per small form) would take more
    than `share` of `memory` (None: unknown, no copies)."""
    thresholds = {form: plan.from_rows(form) for form in SMALL_FORMS}
    kept = {form: t for form, t in thresholds.items() if t is not None and t <= max_rows}
    fitted = replace(plan, kernel=kept.get("kernel"), int4=kept.get("int4"), pair=kept.get("pair"))
    need = sum(weights.get(form, 0) for form in kept) * plan.dtype.itemsize
    if need and (memory is None or need > share * memory):
        return replace(plan, kernel=None, int4=None, pair=None)
    return fitted


# ---- the cache -------------------------------------------------------------------------------


class _Cached(msgspec.Struct, forbid_unknown_fields=True):
    schema: int
    key: str
    dtype: str
    kernel: int | None
    int4: int | None
    pair: int | None


def cache_dir() -> Path:
    return user_cache.cache_root() / "autotune"


def _cache_path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def load_cached(key: str, flags: frozenset[str]) -> DensePlan | None:
    """The cached plan for `key`, or None where there is none or it does not validate (a file
    that is too big, malformed, for another key, with thresholds outside ROWS, or bf16 copies on a
    CPU without native bf16): a bad file is ignored, with a warning, and measured over."""
    path = _cache_path(key)
    try:
        if path.stat().st_size > _MAX_CACHE_BYTES:
            raise ValueError("too big")
        if not user_cache.is_private(path.parent):
            raise ValueError("the cache folder is writable by others or not this user's")
        entry = msgspec.json.decode(path.read_bytes(), type=_Cached, strict=True)
        if entry.schema != _SCHEMA or entry.key != key:
            raise ValueError("another key or schema")
        if entry.dtype not in DTYPES or (entry.dtype == "bf16" and not native_bf16(flags)):
            raise ValueError(f"dtype {entry.dtype!r} is not one this CPU takes")
        for value in (entry.kernel, entry.int4, entry.pair):
            if value is not None and value not in ROWS:
                raise ValueError(f"threshold {value} is not one of {ROWS}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("engine.autotune_cache_ignored", path=str(path), reason=str(exc))
        return None
    return DensePlan(kernel=entry.kernel, int4=entry.int4, pair=entry.pair, dtype=DTYPES[entry.dtype])


def store(key: str, plan: DensePlan) -> None:
    """Cache `plan` under `key` (a private folder, an atomic rename); a cache that cannot be
    written costs a measurement at the next start, nothing else."""
    path = _cache_path(key)
    entry = _Cached(_SCHEMA, key, _name(plan.dtype), plan.kernel, plan.int4, plan.pair)
    try:
        user_cache.private_dir(path.parent, "the weight-form cache")
        user_cache.write_atomically(path, msgspec.json.encode(entry))
    except (OSError, InternalError) as exc:
        log.warning("engine.autotune_cache_unwritable", path=str(path), reason=str(exc))


# ---- putting it together ---------------------------------------------------------------------


def groups_from(
    tensors: Mapping[str, tuple[str, list[int]]],
    blocks: Callable[[str], torch.Tensor],
    cpu_kernels_loaded: bool,
) -> list[tuple[float, Callable[[], list[CpuQMatmul]]]]:
    """The shape groups to time: per distinct (format, shape) of `tensors` (name → (format,
    stored shape)), how many of the timed weights the model's weights of that shape amount to,
    and a function preparing the first few of them (up to STREAM_BYTES of bf16, MAX_PER_SHAPE),
    read with `blocks(name)`. A weight bigger than STREAM_BYTES (an embedding used as the output
    layer: 128k rows) is timed on its first rows only and scaled up: the time of these matmuls
    grows in proportion to the rows, and a whole one in bf16 and f32 would take ~1.5 GB and seconds."""
    by_shape: dict[tuple[str, int, int], list[str]] = {}
    for name, (fmt, shape) in sorted(tensors.items()):
        by_shape.setdefault((fmt, shape[0], shape[1]), []).append(name)
    groups: list[tuple[float, Callable[[], list[CpuQMatmul]]]] = []
    for (fmt, rows, width), names in by_shape.items():
        cols = max(1, stored_format(fmt).cols(width))
        cap = max(_ROW_STEP, STREAM_BYTES // (2 * cols) // _ROW_STEP * _ROW_STEP)
        kept = min(rows, cap)

        def make(fmt: str = fmt, names: list[str] = names, kept: int = kept) -> list[CpuQMatmul]:
            modules: list[CpuQMatmul] = []
            for name in names:
                weight = blocks(name)[:kept]
                modules.append(CpuQMatmul(weight, fmt, dense_copy=False, cpu_kernels=cpu_kernels_loaded))
                streamed = sum(m.out_features * m.in_features * 2 for m in modules)
                if streamed >= STREAM_BYTES or len(modules) >= MAX_PER_SHAPE:
                    break
            return modules

        groups.append((len(names) * rows / kept, make))
    return groups


def tune(
    key: str,
    groups: list[tuple[float, Callable[[], list[CpuQMatmul]]]],
    act_dtype: torch.dtype,
    flags: frozenset[str] | None = None,
) -> Tuning:
    """The cached plan for `key`, else one measured now (and cached); the defaults where the
    measurement runs past its budget."""
    flags = cpu_kernels.effective_cpu_flags() if flags is None else flags
    cached = load_cached(key, flags)
    if cached is not None:
        return Tuning(cached, "cached")
    dtypes = [DTYPES["bf16"]] if native_bf16(flags) else []
    dtypes.append(DTYPES["f32"])
    started = time.perf_counter()
    timings = measure(groups, dtypes, act_dtype)
    seconds = round(time.perf_counter() - started, 3)
    if timings is None:
        # Cached too: a host too busy to measure in budget gets the (safe) defaults at once from now
        # on rather than the same pause at every start; removing the file measures again.
        plan = default_plan(flags)
        log.warning(
            "engine.autotune_over_budget",
            budget_s=BUDGET_S,
            seconds=seconds,
            advice=f"using the defaults; remove {_cache_path(key)} to measure again",
        )
        store(key, plan)
        return Tuning(plan, "defaults")
    plan = decide(timings, flags)
    rounded = {form: {k: [round(t, 3) for t in v] for k, v in times.items()} for form, times in timings.items()}
    log.debug("engine.autotune_timings", rows=ROWS, timings_ms=rounded)
    log.info("engine.autotune_measured", seconds=seconds, key=key)
    store(key, plan)
    return Tuning(plan, "measured", rounded)
