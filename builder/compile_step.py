"""Compile the decode step ahead of time: torch.export, then an AOTInductor package (CPU).

One package serves every batch bucket: the batch and the block-table width are dynamic
dimensions (a static package per bucket took ~2 minutes each to compile on 2 cores,
docs/notes/aot-compile-spike.md). The package holds no weights
(`aot_inductor.package_constants_in_so=False`): the runtime prepares the artifact's tensors as
for eager execution (the packed int4 layout depends on the CPU anyway) and hands them over at
load. The few constants the compiler makes itself (the int4 kernel's group size, traced rope
tables) are saved beside the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.export import Dim

from llmc.artifacts.manifest import CompiledStep, ModelSpec
from llmc.artifacts.writer import read_staged_tensors
from llmc.builder import DEFAULT_BUCKETS
from llmc.errors import BadInputError, InternalError
from llmc.kernels import cpu_kernels
from llmc.kernels.paged_attention import PagedAttention
from llmc.kernels.qmatmul_cpu import DENSE_MIN_ROWS, CpuQMatmul, has_dense_choice, weight_form
from llmc.logs import get_logger
from llmc.model.decode_step import DecodeStep
from llmc.model.decoder import CausalLM, DeviceKernels, build_model
from llmc.model.kv_layout import allocate_kv_caches

log = get_logger("llmc.builder.compile")

DEFAULT_BLOCK_SIZE = 16  # the engine's default KV block size (runtime/engine.py)
# One package per prepared weight form (kernels/qmatmul_cpu.py): "packed" covers every bucket,
# "dense" the buckets of DENSE_MIN_ROWS rows and more, where bf16 GEMMs beat the int4 kernels.
PACKAGE_STEMS = {"packed": "compiled/decode_cpu", "dense": "compiled/decode_cpu_dense"}
# Upper bound of the traced KV cache length in slots: 2^28 tokens is far beyond any cache a host
# holds; the bound only has to exist for export's range analysis.
_MAX_KV_SLOTS = 1 << 28


@dataclass(frozen=True)
class CompileOptions:
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    max_seq_len: int | None = None  # None: the model's context length
    block_size: int = DEFAULT_BLOCK_SIZE


def not_compilable(spec: ModelSpec) -> str | None:
    """Why this model's decode step cannot be compiled yet, or None when it can."""
    if spec.num_experts:
        return "mixture-of-experts routing groups tokens by data-dependent counts, which export cannot trace"
    if (spec.rope_scaling or {}).get("rope_type") == "longrope":
        return "longrope switches factors per sequence length"
    return None


def check_options(options: CompileOptions, spec: ModelSpec) -> tuple[list[int], int]:
    """The sorted buckets and the max sequence length, or a BadInputError saying what is wrong."""
    buckets = sorted(set(options.buckets))
    if not buckets or buckets[0] < 1:
        raise BadInputError(f"--buckets must be positive batch sizes, got {list(options.buckets)}")
    max_seq_len = options.max_seq_len or spec.max_position_embeddings
    if max_seq_len > spec.max_position_embeddings:
        raise BadInputError(
            f"--max-seq-len {max_seq_len} exceeds the model's context length {spec.max_position_embeddings}"
        )
    if max_seq_len < options.block_size:
        raise BadInputError(f"--max-seq-len must be at least the block size {options.block_size}")
    return buckets, max_seq_len


_SERIALIZATION_ID = ".data/serialization_id"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# The start of torch's deprecation message for LeafSpec (a regex, matched at the message's start).
_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def _make_reproducible(package: Path) -> None:
    """Rewrite the package so that equal code gives equal bytes: drop the generated C++ sources
    (the loader needs only the shared object; the sources embed cache paths and differ between a
    fresh compile and a cached one) and derive the random serialization id from the contents."""
    with zipfile.ZipFile(package) as source:
        entries = [
            (info.filename, source.read(info)) for info in source.infolist() if not info.filename.endswith(".cpp")
        ]
    digest = hashlib.sha1(usedforsecurity=False)
    for name, data in sorted(entries):
        if not name.endswith(_SERIALIZATION_ID):
            digest.update(name.encode() + b"\0" + data)
    with zipfile.ZipFile(package, "w", compression=zipfile.ZIP_STORED) as target:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            target.writestr(info, digest.hexdigest().encode() if name.endswith(_SERIALIZATION_ID) else data)


@contextlib.contextmanager
def _compiler_errors(what: str) -> Iterator[None]:
    """torch.export's and Inductor's own failures (an untraceable op, a C++ compile error) as one
    InternalError that says what to do, instead of a traceback."""
    try:
        yield
    except Exception as exc:
        log.debug("compile.failed", stage=what, error=str(exc))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InternalError(
            f"{what} the decode step failed ({first}); build with --no-compile for an eager artifact, "
            "and report the failure with the output of --log-level DEBUG"
        ) from exc


@contextlib.contextmanager
def _no_leafspec_warning() -> Iterator[None]:
    """Hide torch's own FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated".

    Inductor's debug wrapper (torch/_dynamo/repro/after_aot.py) deep-copies the FX graph, which
    re-creates torch's deprecated LeafSpec class; llmc never touches LeafSpec, so the warning is
    torch's to fix and tells a user of `llmc build` nothing. Only that one message is filtered.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LEAFSPEC_WARNING, category=FutureWarning)
        yield


@contextlib.contextmanager
def _recorded_constants() -> Iterator[dict[str, torch.Tensor]]:
    """Record every constant Inductor registers, by the name its generated code uses.

    AOTInductor gives no other way to learn the values of the constants it creates itself (the
    int4 kernel's group size becomes a tensor constant), and with the weights left out of the
    package those values must come from somewhere at load.
    """
    from torch._inductor.graph import GraphLowering

    recorded: dict[str, torch.Tensor] = {}
    original = GraphLowering.allocate_non_dup_const_name

    def allocate(self: GraphLowering, name: str | None, data: torch.Tensor) -> str:
        new_name: str = original(self, name, data)
        recorded[new_name] = data
        return new_name

    GraphLowering.allocate_non_dup_const_name = allocate  # type: ignore[method-assign]
    try:
        yield recorded
    finally:
        GraphLowering.allocate_non_dup_const_name = original  # type: ignore[method-assign]


def model_from_stage(
    stage: Path,
    tensor_files: list[str],
    spec: ModelSpec,
    formats: dict[str, str],
    dtype: torch.dtype,
    options: CompileOptions,
    kernels_file: str | None,
) -> CausalLM:
    """The model to compile, read back from the weights the build has staged, with the dense
    copies that the "dense" weight form needs, and with the VNNI kernel from the staged CPU kernel
    library `kernels_file` (loaded into this process) if there is one."""
    _, max_seq_len = check_options(options, spec)
    if kernels_file is not None:
        reason = cpu_kernels.load(stage / kernels_file)
        if reason is not None:
            raise InternalError(f"the CPU kernels just compiled do not load: {reason}; build with --no-cpu-kernels")
    weights = read_staged_tensors(stage, tensor_files)
    vnni = kernels_file is not None  # the VNNI matmul and the paged decode attention kernel
    kernels = DeviceKernels(
        matmul=partial(CpuQMatmul, dense_copy=True, vnni=vnni), attention=PagedAttention(cpu_kernel=vnni)
    )
    return build_model(spec, weights, max_seq_len, formats, dtype, kernels)


def compile_from_stage(
    stage: Path,
    tensor_files: list[str],
    spec: ModelSpec,
    formats: dict[str, str],
    dtype: torch.dtype,
    options: CompileOptions,
    weights: str,
    kernels_file: str | None,
) -> tuple[CompiledStep, list[str]]:
    """compile_decode_step in a second process, for another weight form's package at the same
    time as the parent's (build.py)."""
    # One core for this process's own tensor work; the parent compiles beside it.
    torch.set_num_threads(1)
    model = model_from_stage(stage, tensor_files, spec, formats, dtype, options, kernels_file)
    return compile_decode_step(model, options, stage, weights)


def example_inputs(step: DecodeStep, batch: int, num_blocks: int) -> tuple[object, ...]:
    """Valid inputs of the traced shapes: `batch` sequences over a cache of `num_blocks` blocks."""
    spec, bs = step.model.spec, step.block_size
    kv = [cache for pair in allocate_kv_caches(spec, step.model.dtype, num_blocks * bs) for cache in pair]
    width = 2
    tables = torch.arange(batch * width, dtype=torch.int64).remainder(num_blocks).view(batch, width)
    lens = torch.full((batch,), bs + 1, dtype=torch.int64)
    positions = lens - 1
    slots = tables[:, 1] * bs
    ids = torch.zeros(batch, dtype=torch.int64)
    return ids, positions, slots, tables, lens, kv


def weight_forms(model: CausalLM, options: CompileOptions) -> dict[str, list[int]]:
    """The packages to compile for `model`, by weight form, with their buckets."""
    buckets, _ = check_options(options, model.spec)
    forms = {"packed": buckets}
    large = [b for b in buckets if b >= DENSE_MIN_ROWS]
    if large and has_dense_choice(model):
        forms["dense"] = large
    return forms


def calls_cpu_kernels(exported: torch.export.ExportedProgram) -> bool:
    """Whether the traced step calls an op of llmc's CPU kernel library (it then runs only where
    that library loads)."""
    return any(
        node.op == "call_function" and getattr(node.target, "namespace", None) == "llmc"
        for node in exported.graph.nodes
    )


def compile_decode_step(
    model: CausalLM, options: CompileOptions, stage: Path, weights: str = "packed"
) -> tuple[CompiledStep, list[str]]:
    """Export and compile the model's decode step, computing with the `weights` form of its
    quantized layers, into `stage`; return its manifest entry and the files written (relative to
    `stage`)."""
    spec = model.spec
    buckets = weight_forms(model, options)[weights]
    _, max_seq_len = check_options(options, spec)
    package_file = PACKAGE_STEMS[weights] + ".pt2"
    constants_file = PACKAGE_STEMS[weights] + ".constants.safetensors"
    step = DecodeStep(model, options.block_size).eval()
    batch = Dim("batch", min=1, max=buckets[-1])
    width = Dim("block_table_width", min=1, max=max_seq_len // options.block_size)
    kv_slots = Dim("kv_slots", min=2 * options.block_size, max=_MAX_KV_SLOTS)
    args = example_inputs(step, batch=min(3, buckets[-1]), num_blocks=8)
    kv_count = 2 * spec.num_layers
    dynamic = (
        {0: batch},
        {0: batch},
        {0: batch},
        {0: batch, 1: width},
        {0: batch},
        [{0: kv_slots}] * kv_count,
    )
    with torch.no_grad(), weight_form(model, weights), _compiler_errors("tracing"):
        exported = torch.export.export(step, args, dynamic_shapes=dynamic)
    log.info(
        "compile.exported", layers=spec.num_layers, weights=weights, max_batch=buckets[-1], max_seq_len=max_seq_len
    )
    package = stage / package_file
    package.parent.mkdir(parents=True, exist_ok=True)
    fqns = {name for name, _ in step.named_parameters(remove_duplicate=False)}
    fqns |= {name for name, _ in step.named_buffers(remove_duplicate=False)}
    mangled = {name.replace(".", "_") for name in fqns}
    configs: dict[str, object] = {
        "aot_inductor.package_constants_in_so": False,
        # No -march=native: the code may use only what the recorded CPU capability promises,
        # so that the package runs on any CPU the runtime's capability check lets it load on.
        "cpp.march": "",
    }
    with _recorded_constants() as recorded, _compiler_errors("compiling"), _no_leafspec_warning():
        torch._inductor.aoti_compile_and_package(exported, package_path=str(package), inductor_configs=configs)
    _make_reproducible(package)
    made = {
        name: value.detach().clone().contiguous()
        for name, value in recorded.items()
        if name not in fqns and name not in mangled
    }
    save_file(made, str(stage / constants_file), metadata={"format": "pt"})
    info = CompiledStep(
        kind="decode",
        target="cpu",
        package=package_file,
        constants=constants_file,
        buckets=buckets,
        max_seq_len=max_seq_len,
        block_size=options.block_size,
        torch_version=torch.__version__.split("+")[0],
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        weights=weights,
        cpu_kernels=calls_cpu_kernels(exported),
    )
    return info, [package_file, constants_file]
