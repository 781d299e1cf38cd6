"""The CPU target: llmc's CPU kernel library, and the decode step compiled ahead of time
(torch.export, then an AOTInductor package).

One package serves every batch bucket: the batch and the block-table width are dynamic
dimensions (a static package per bucket took ~2 minutes each to compile on 2 cores,
docs/notes/aot-compile-spike.md). The package holds no weights
(`aot_inductor.package_constants_in_so=False`): the runtime prepares the artifact's tensors as
for eager execution (the packed int4 layout depends on the CPU anyway) and hands them over at
load, the rope tables too (sized to the context it serves). The few constants the compiler makes
itself (the int4 kernel's group size) are saved beside the package.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import multiprocessing
import os
import platform
import re
import shlex
import signal
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import msgspec
import torch
from safetensors.torch import save_file
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from llmc.artifacts.manifest import CompiledStep, KernelLibrary, LayerProgram, ModelSpec, Program, TargetCode
from llmc.artifacts.writer import ArtifactWriter
from llmc.builder import CPU_ISAS, DEFAULT_CPU_ISA, compile_cache
from llmc.builder.layer_programs import (
    CALL_SECONDS,
    ProgramPlan,
    call_budget,
    layer_signature,
    plan_programs,
    schedule,
)
from llmc.builder.targets.base import (
    CompileOptions,
    Progress,
    Target,
    TargetOutput,
    check_options,
    not_compilable,
)
from llmc.errors import BadInputError, InternalError, LlmcError
from llmc.kernels.cpu import autotune, cpu_kernels
from llmc.kernels.cpu.half_matmul import CpuHalfMatmul
from llmc.kernels.cpu.qmatmul_cpu import DENSE_MIN_ROWS, CpuQMatmul, has_dense_choice, weight_form
from llmc.kernels.cpu.rms_norm import use_cpu_rms_norm
from llmc.kernels.paged_attention import PagedAttention
from llmc.logs import configure, get_logger
from llmc.model.decode_step import DecodeLayers
from llmc.model.decoder import CausalLM, DeviceKernels, build_model
from llmc.model.half_linear import WidenedLinear
from llmc.model.kv_layout import allocate_kv_caches
from llmc.model.quant_linear import QuantEmbedding
from llmc.quant.formats import FORMATS

log = get_logger("llmc.builder.compile")

# One package per prepared weight form (kernels/cpu/qmatmul_cpu.py): "packed" covers every bucket,
# "dense" the buckets of DENSE_MIN_ROWS rows and more, where bf16 GEMMs beat the int4 kernels.
_COMPILED_DIR = "compiled/"
PACKAGE_STEMS = {"packed": _COMPILED_DIR + "decode_cpu", "dense": _COMPILED_DIR + "decode_cpu_dense"}
# The compiling processes a plan assumes (a CI runner's two cores), whatever the host has: the plan
# decides the artifact's programs, which must not depend on the machine that builds it.
PLANNED_PROCESSES = 2
# A compile job: a weight form, a CPU capability, and one of a step's programs (an index into its
# plan's programs).
Job = tuple[str, str, int]


@dataclass(frozen=True)
class PartMeta:
    """What a traced program computes."""

    fqns: frozenset[str]  # module_fqns of the traced module
    layers: int  # consecutive decoder layers
    logits: bool  # it ends with the final norm and the logits
    embed: bool  # it starts from the token ids
    embed_select: bool  # it takes the token ids and a flag beside its input
    logits_select: bool  # it takes a flag after its input, and returns the logits beside its output


@dataclass(frozen=True)
class CompiledPart:
    """One compiled program of a step (a Job done), as a process hands it back."""

    weights: str
    capability: str
    part: int
    program: LayerProgram
    cpu_kernels: bool  # whether it calls the CPU kernel library


# Upper bound of the traced KV cache length in slots: 2^28 tokens is far beyond any cache a host
# holds; the bound only has to exist for export's range analysis.
_MAX_KV_SLOTS = 1 << 28
# The dtypes of the staged weight files (artifacts/writer.py writes no others), by safetensors' name.
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
}


def kernels_file(isa: str) -> str:
    """Where the artifact keeps the CPU kernel library for `isa`."""
    return "kernels/" + cpu_kernels.library_name(isa)


# The x86-64 vector ISA nearly every CPU of the last ten years has, by torch's capability name.
BASELINE_CAPABILITY = "AVX2"
# torch's x86 capabilities from least to most, with the vector width Inductor's `cpp.simdlen`
# takes to generate code for each (its ISA choice otherwise follows the build host).
X86_CAPABILITIES = {"DEFAULT": 0, "AVX2": 256, "AVX512": 512}

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


# Staged tensors read for real: act-order input permutations (int32 [in_features], small) decide
# the model's structure (which projections fuse, model/quant_linear.py FusedQuantLinear.fusable),
# which must come out as the runtime's, and a fake tensor has no values to compare.
_REAL_SUFFIX = ".input_perm"


def staged_fakes(stage: Path, tensor_files: list[str], mode: FakeTensorMode) -> dict[str, torch.Tensor]:
    """Fake tensors (shape and dtype, no data) of every tensor the stage's weight files hold (but
    the input permutations, _REAL_SUFFIX), read from their headers only: tracing needs no weight's
    value, and reading the weights back would hold the whole model (issue 24: the 3B build's
    compile stage reached 14 GB)."""
    from safetensors import safe_open

    fakes: dict[str, torch.Tensor] = {}
    for file in tensor_files:
        with safe_open(str(stage / file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                if name.endswith(_REAL_SUFFIX):
                    fakes[name] = handle.get_tensor(name)
                    continue
                view = handle.get_slice(name)
                stored = view.get_dtype()
                if stored not in _SAFETENSORS_DTYPES:
                    raise InternalError(f"staged tensor {name} has dtype {stored}, which the builder never writes")
                with mode:
                    fakes[name] = torch.empty(view.get_shape(), dtype=_SAFETENSORS_DTYPES[stored])
    return fakes


@contextlib.contextmanager
def _no_buffer_copies() -> Iterator[None]:
    """Keep Inductor from copying every buffer of the traced module (the prepared weight forms).

    Before compiling, Inductor clones each buffer (compile_fx._unlift_graph) to keep its initial
    value for the constants it embeds in the package, in case the graph mutates it. These packages
    embed no constants (`package_constants_in_so=False`) and the decode step mutates no buffer, so
    the copies are never read; but written, they are resident: the size of every prepared form
    (9 GB at 3B, issue 24). An unwritten tensor of the same layout takes their place.
    """
    from torch._inductor import compile_fx

    def unwritten(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)

    original = compile_fx.clone_preserve_strides
    compile_fx.clone_preserve_strides = unwritten
    try:
        yield
    finally:
        compile_fx.clone_preserve_strides = original


# What the wrapper's input checks become (see _no_input_check_code): the two functions the rest of
# the generated code calls, doing nothing, the switch a compile-time constant so that the compiler
# drops every check it guards.
_NO_INPUT_CHECKS = """
static constexpr bool _check_aoti_runtime_check_inputs_env() { return false; }
AOTI_NOINLINE static void __check_inputs_outputs(AtenTensorHandle*, AtenTensorHandle*) {}
"""


@contextlib.contextmanager
def _no_input_check_code() -> Iterator[None]:
    """Keep AOTInductor from generating its debug checks of the inputs' dtypes, sizes and strides.

    They run only when $AOTI_RUNTIME_CHECK_INPUTS is set, but their code is half of the wrapper
    that g++ compiles (5,400 of 11,900 lines for SmolLM2's step, 18 s of CPU against 11 s without,
    docs/BENCHMARKS.md). llmc checks the inputs itself before every call (runtime/bucketed_step.py),
    the checks that matter: the slots and block ids against the cache. A torch without the method
    generates its checks as before.
    """
    from torch._inductor.codegen import cpp_wrapper_cpu

    wrapper = cpp_wrapper_cpu.CppWrapperCpu
    original = getattr(wrapper, "generate_input_output_runtime_checks", None)
    if original is None:
        yield
        return

    def no_checks(self: cpp_wrapper_cpu.CppWrapperCpu) -> None:
        # The AOT half of torch 2.13's dual buffer; a single buffer in torches before it.
        splice = getattr(self.prefix, "splice_aot", None) or self.prefix.splice
        splice(_NO_INPUT_CHECKS)

    wrapper.generate_input_output_runtime_checks = no_checks  # type: ignore[method-assign]
    try:
        yield
    finally:
        wrapper.generate_input_output_runtime_checks = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _probe_only_the_chosen_isa() -> Iterator[None]:
    """Keep Inductor from test-compiling vector ISAs that the package does not use.

    Inductor lists the vector ISAs this machine can build by compiling and loading a probe for each
    AVX-512 extension (VNNI, BF16, AMX, AMX-FP16): six g++ runs, ~3 s of a cold build on 2 cores,
    before it picks the one ISA of `cpp.simdlen`. Where `cpp.simdlen` names the width (a package for
    another capability than this machine's, e.g. the default AVX2 one), only the ISAs of that width
    are tested. A package for this machine's own ISA (no simdlen) keeps every probe: its AVX-512
    flags come from them.
    """
    from torch._inductor import config, cpu_vec_isa

    original = cpu_vec_isa.valid_vec_isa_list

    def of_the_chosen_width() -> list[cpu_vec_isa.VecISA]:
        width = config.cpp.simdlen
        if width is None or platform.machine() not in ("x86_64", "AMD64") or sys.platform not in ("linux", "win32"):
            return original()
        flags = cpu_vec_isa.x86_isa_checker()
        return [
            isa
            for isa in cpu_vec_isa.supported_vec_isa_list
            if isa.bit_width() == width and all(flag in flags for flag in str(isa).split()) and isa
        ]

    cpu_vec_isa.valid_vec_isa_list = of_the_chosen_width  # type: ignore[assignment]
    try:
        yield
    finally:
        cpu_vec_isa.valid_vec_isa_list = original


def _machine_folders() -> list[tuple[str, str]]:
    """The folders of this machine whose paths a package would embed, each with the placeholder
    that stands for it, longest first (a folder inside another is replaced first): Inductor's
    cache, where the generated sources are; torch's install, whose headers they include; Python's."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folders = {
        cache_dir(): "inductor",
        str(Path(torch.__file__).parent): "torch",
        sys.prefix: "python",
        sys.base_prefix: "python-base",
    }
    return sorted(((path, name) for path, name in folders.items() if path), key=lambda f: -len(f[0]))


def _without_folders(text: str, folders: list[tuple[str, str]]) -> str:
    for path, name in folders:
        text = text.replace(path, name)
    return text


@contextlib.contextmanager
def _no_machine_paths() -> Iterator[None]:
    """Keep this machine's paths out of a package's bytes, so that the same code compiled by another
    user, in another Inductor cache folder or against a torch installed elsewhere gives the same
    bytes (reproducible builds: a CI runner can check an artifact against another's).

    Two things carried them in. Inductor names the generated sources by a hash of their text and
    of the compile command, and the kernels' text names the wrapper's path: the names, which the
    package's files and the shared object carry, changed with the cache folder and the install.
    And the shared object holds the sources' and torch's headers' paths (`__FILE__` in their
    checks' messages). Here the names hash the text with those folders replaced by placeholders,
    and the compiler maps the folders to the same placeholders (`-ffile-prefix-map`, GCC 8 and
    Clang 10 on; llmc's C++20 kernels need newer ones anyway).
    """
    from torch._inductor import codecache, cpp_builder

    folders = _machine_folders()
    original_write = codecache.write
    original_command = cpp_builder.CppBuilder.get_command_line

    def write(
        content: str | bytes,
        extension: str,
        extra: str = "",
        hash_type: str = "code",
        specified_dir: str = "",
        key: str | None = None,
    ) -> tuple[str, str]:
        if key is None and isinstance(content, str) and extension in ("wrapper.cpp", "kernel.cpp"):
            key = codecache.get_hash(_without_folders(content, folders).strip(), _without_folders(extra, folders))
        return original_write(content, extension, extra, hash_type, specified_dir, key)

    def command(self: cpp_builder.CppBuilder) -> str:
        line = original_command(self)
        if sys.platform == "win32":  # MSVC has no prefix maps; its packages keep the paths
            return line
        # The last map that matches wins: the longest folder last. Quoted: Inductor splits the
        # line as a shell would.
        return line + "".join(" " + shlex.quote(f"-ffile-prefix-map={path}={name}") for path, name in reversed(folders))

    codecache.write = write
    cpp_builder.CppBuilder.get_command_line = command  # type: ignore[method-assign]
    try:
        yield
    finally:
        codecache.write = original_write
        cpp_builder.CppBuilder.get_command_line = original_command  # type: ignore[method-assign]


@contextlib.contextmanager
def _wrapper_beside_the_kernels() -> Iterator[None]:
    """Compile a package's wrapper and its kernels at once, in two g++ processes.

    AOTInductor compiles the wrapper, then the kernels, then links the two: 10.7 s and 3.3 s one
    after the other in a cold default build on 2 cores (docs/BENCHMARKS.md), while the kernel
    libraries are long done and the second core is idle. The wrapper's compile starts in a thread
    here; the next compile of the same thread (the kernels') runs beside it and waits for it before
    returning, so the link finds both objects and a failure of either is raised there.
    """
    from torch._inductor import cpp_builder

    original = cpp_builder.CppBuilder.build
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmc-wrapper-compile")
    pending: dict[int, Future[None]] = {}  # by the thread that started it

    def build(self: cpp_builder.CppBuilder) -> None:
        caller = threading.get_ident()
        if self.get_target_file_path().endswith(".wrapper.o") and caller not in pending:
            pending[caller] = pool.submit(original, self)
            return
        try:
            original(self)
        finally:
            job = pending.pop(caller, None)
            if job is not None:
                job.result()

    cpp_builder.CppBuilder.build = build  # type: ignore[method-assign]
    try:
        yield
    except BaseException:
        for job in pending.values():  # the compile stopped in between: its own error is the one raised
            job.exception()
        raise
    else:
        for job in pending.values():  # a wrapper no later compile waited for: its failure is not lost
            job.result()
    finally:
        cpp_builder.CppBuilder.build = original  # type: ignore[method-assign]
        pool.shutdown(wait=True)


def model_from_stage(
    stage: Path,
    tensor_files: list[str],
    spec: ModelSpec,
    formats: dict[str, str],
    dtype: torch.dtype,
    options: CompileOptions,
    library: KernelLibrary | None,
) -> CausalLM:
    """The model to compile, with fake weights of the staged weights' shapes and dtypes and every
    prepared form the weight forms need (the dense copies too), computed as fake tensors: the
    packages hold no weights (the runtime feeds the prepared tensors at load), so the trace needs
    only shapes, dtypes and strides, and the compile holds no weight whatever the model's size.
    The tables the model computes itself (rope) are built outside the fake mode and stay real
    (buffers the runtime hands over like the weights). llmc's CPU kernels come from the staged
    `library` (loaded into this process) if any."""
    _, max_seq_len = check_options(options, spec)
    if library is not None:
        reason = cpu_kernels.load(stage / library.file, library.isa)
        if reason is not None:
            raise InternalError(f"the CPU kernels just compiled do not load: {reason}; build with --no-cpu-kernels")
    # The shape environment with tracked fakes is what torch.export asks of a fake mode it adopts;
    # non-fake inputs are allowed for the real tables the model mixes in (rope).
    mode = FakeTensorMode(shape_env=ShapeEnv(tracked_fakes=[]), allow_non_fake_inputs=True)
    weights = staged_fakes(stage, tensor_files, mode)
    loaded = library is not None  # the quantized matmul and the paged decode attention kernel
    kernels = DeviceKernels(
        matmul=partial(CpuQMatmul, dense_copy=True, cpu_kernels=loaded),
        attention=PagedAttention(cpu_kernel=loaded),
        half_matmul=CpuHalfMatmul if loaded else WidenedLinear,
        prepare_norms=use_cpu_rms_norm if loaded else None,
    )
    return build_model(spec, weights, max_seq_len, formats, dtype, kernels)


def fake_mode_of(model: torch.nn.Module) -> FakeTensorMode | None:
    """The fake mode of `model`'s fake weights (model_from_stage), or None for a real model."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if isinstance(tensor, FakeTensor):
            return tensor.fake_mode
    return None


def compile_in_worker(
    stage: Path,
    tensor_files: list[str],
    spec: ModelSpec,
    formats: dict[str, str],
    dtype: torch.dtype,
    options: CompileOptions,
    library: KernelLibrary | None,
    plan: ProgramPlan,
    jobs: list[Job],
    threads: int,
) -> list[CompiledPart]:
    """compile_parts in a second process, at the same time as the parent's (_compile_packages).
    It rebuilds the model and traces its programs itself: that takes less of the parent's time
    than tracing them there and handing them over (torch.export.save and load: ~2 s each for one
    3B layer, against ~4 s here while the parent compiles)."""
    # One core for this process's own tensor work; the parent compiles beside it.
    torch.set_num_threads(1)
    model = model_from_stage(stage, tensor_files, spec, formats, dtype, options, library)
    return compile_parts(model, options, stage, plan, jobs, threads)


def example_inputs(
    model: CausalLM, block_size: int, batch: int, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Valid decode-step inputs of the traced shapes: `batch` sequences over a cache of
    `num_blocks` blocks, with the caches of every layer.

    Each cache gets its own storage. The runtime's caches are views of one allocation
    (model/kv_layout.py), and traced as such they alias in the compiler's eyes: AOTAutograd and
    Inductor's re-inplacing pass then check every pair of them for overlap under symbolic shapes,
    ~25 s of SmolLM2's 70 s compile (docs/BENCHMARKS.md). The views never overlap, so a program
    traced on separate tensors runs on them unchanged."""
    shared = allocate_kv_caches(model.spec, model.dtype, num_blocks * block_size)
    kv = [cache.clone() for pair in shared for cache in pair]
    width = 2
    tables = torch.arange(batch * width, dtype=torch.int64).remainder(num_blocks).view(batch, width)
    lens = torch.full((batch,), block_size + 1, dtype=torch.int64)
    positions = lens - 1
    slots = tables[:, 1] * block_size
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


def capabilities(isa: str, host: str) -> list[str]:
    """The CPU capabilities to compile for under `--cpu-isa isa` on a `host` machine, best first.
    Only x86 has a baseline below the host (an ARM or other host compiles for itself)."""
    if isa not in CPU_ISAS:
        raise BadInputError(f"--cpu-isa {isa!r} is not one of {', '.join(CPU_ISAS)}")
    below = host in X86_CAPABILITIES and X86_CAPABILITIES[host] > X86_CAPABILITIES[BASELINE_CAPABILITY]
    if not below or isa == "host":
        return [host]
    return [BASELINE_CAPABILITY] if isa == "baseline" else [host, BASELINE_CAPABILITY]


def inductor_configs(capability: str, host: str, threads: int) -> dict[str, object]:
    """Inductor's options for a package that runs on `capability` CPUs, compiled on `host`, whose
    parallel loops are laid out for `threads` threads."""
    configs: dict[str, object] = {
        # Inductor lays out parallel loops for torch.get_num_threads() of the compiling process
        # unless told: named, so that a package compiled in a helper process (which computes on
        # one thread) is the one the build process would make, and part of the cache key.
        "cpp.threads": threads,
        "aot_inductor.package_constants_in_so": False,
        # No -march=native: the code may use only what the recorded CPU capability promises,
        # so that the package runs on any CPU the runtime's capability check lets it load on.
        "cpp.march": "",
        # No line tables (-g1): they cost compile time and embed the paths of Inductor's cache, so
        # that the same code compiled in another cache folder would give other bytes.
        "aot_inductor.enable_line_tables": False,
        # Inductor first proves that the compiler builds each vector ISA the CPU reports, by
        # compiling torch's vector headers once per ISA and loading the result in a child
        # process: ~8 s of a cold build on 2 cores, paid again by the process compiling the
        # second package. The CPU's own report (cpuid) decides the ISA here; a compiler too old for
        # it (GCC builds AVX-512 since 4.9, and compiles llmc's AVX-512 VNNI kernels in the same
        # build unless --no-cpu-kernels) fails the compile with its own message, not silently.
        "cpp.vec_isa_ok": True,
        # No precompiled headers. AOTInductor would first compile the wrapper's and the kernels'
        # torch headers into two .gch files (~130 and ~146 MB) and then include them. On a machine
        # without them that is 5.9 + 5.6 s of g++ for one package, more than they save it, and
        # the files land in /tmp/torchinductor_$USER, outside every cache llmc controls, a new pair
        # for each torch install path and flag set, never removed (docs/BENCHMARKS.md).
        "aot_inductor.precompile_headers": False,
    }
    if capability != host:
        # The vector width picks Inductor's ISA (cpu_vec_isa.pick_vec_isa): its generated kernels
        # then use only that ISA's instructions and are compiled with its flags.
        configs["cpp.simdlen"] = X86_CAPABILITIES[capability]
    return configs


def package_stem(weights: str, capability: str, host: str) -> str:
    """Where a package goes in the artifact: the host's keeps the plain name, others say their ISA."""
    stem = PACKAGE_STEMS[weights]
    return stem if capability == host else f"{stem}_{capability.lower()}"


def export_layers(
    model: CausalLM,
    options: CompileOptions,
    weights: str,
    first: int = 0,
    count: int | None = None,
    logits: bool = False,
    embed: bool = False,
    embed_select: bool = False,
    logits_select: bool = False,
) -> tuple[torch.export.ExportedProgram, DecodeLayers, list[int]]:
    """Trace decoder layers [first, first + count) of the decode step (default: all of them), with
    `logits` the final norm and logits after them, with `embed` from the token ids, with
    `embed_select` from the ids beside its input where a flag says, with `logits_select` the logits
    beside its output where a flag says (DecodeLayers), computing with
    the `weights` form of the quantized layers, with a dynamic batch and block-table width: the
    program, the traced module and its buckets."""
    spec = model.spec
    count = spec.num_layers - first if count is None else count
    buckets = weight_forms(model, options)[weights]
    _, max_seq_len = check_options(options, spec)
    module = DecodeLayers(model, first, count, options.block_size, logits, embed, embed_select, logits_select).eval()
    batch = Dim("batch", min=1, max=buckets[-1])
    width = Dim("block_table_width", min=1, max=max_seq_len // options.block_size)
    kv_slots = Dim("kv_slots", min=2 * options.block_size, max=_MAX_KV_SLOTS)
    ids, positions, slots, tables, lens, kv = example_inputs(model, options.block_size, min(3, buckets[-1]), 8)
    hidden = ids if embed else torch.zeros(len(ids), spec.hidden_size, dtype=model.dtype)
    args: tuple[object, ...] = (hidden, positions, slots, tables, lens, kv[2 * first : 2 * (first + count)])
    dynamic: tuple[object, ...] = (
        {0: batch},
        {0: batch},
        {0: batch},
        {0: batch, 1: width},
        {0: batch},
        [{0: kv_slots}] * (2 * count),
    )
    if embed_select or logits_select:  # the ids and their flag, or None for both (not inputs then)
        args += (ids, torch.tensor([True])) if embed_select else (None, None)
        dynamic += ({0: batch}, None) if embed_select else (None, None)
    if logits_select:
        args += (torch.tensor([True]),)
        dynamic += (None,)
    started = time.perf_counter()
    exported = _export(model, weights, module, args, dynamic)
    log.info(
        "build.stage",
        stage="export",
        weights=weights,
        seconds=round(time.perf_counter() - started, 3),
        first_layer=first,
        layers=count,
        max_batch=buckets[-1],
        max_seq_len=max_seq_len,
    )
    return exported, module, buckets


def _export(
    model: CausalLM, weights: str, module: torch.nn.Module, args: tuple[object, ...], dynamic: tuple[object, ...]
) -> torch.export.ExportedProgram:
    """torch.export of a part of `model`'s step, computing with the `weights` form."""
    # A model with fake weights is traced in their fake mode (export adopts the active one).
    fake = fake_mode_of(model)
    traced_in = fake if fake is not None else contextlib.nullcontext()
    with torch.no_grad(), weight_form(model, weights), _compiler_errors("tracing"), traced_in:
        exported = torch.export.export(module, args, dynamic_shapes=dynamic)
    if fake is not None:
        _unbacked_weights(exported)
    return exported


def _unbacked_weights(exported: torch.export.ExportedProgram) -> None:
    """Swap the program's fake weights for real tensors of the same shapes, dtypes and strides
    whose memory is never written: Inductor compiles from real tensors, and the package leaves
    the weights out (`package_constants_in_so=False`), so their pages are never touched and cost
    no resident memory (an untouched allocation is only address space)."""
    for table in (exported.state_dict, exported.constants):
        for name, value in list(table.items()):
            if isinstance(value, FakeTensor):
                empty = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
                parameter = isinstance(value, torch.nn.Parameter)
                table[name] = torch.nn.Parameter(empty, requires_grad=False) if parameter else empty


def module_fqns(module: torch.nn.Module) -> frozenset[str]:
    """The names of `module`'s parameters and buffers: the tensors the runtime hands its program."""
    names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return frozenset(names | {name for name, _ in module.named_buffers(remove_duplicate=False)})


def lower_program(
    exported: torch.export.ExportedProgram,
    fqns: frozenset[str],
    stage: Path,
    stem: str,
    capability: str,
    threads: int,
) -> Program:
    """Compile an exported part of the step (DecodeLayers, DecodeLogits) into an AOTInductor
    package for `capability` CPUs, as `stem`.pt2 in `stage`: its files (relative to `stage`).
    `fqns` (module_fqns) are the tensors the runtime hands it; the others it records are its own."""
    started = time.perf_counter()
    host = torch.backends.cpu.get_cpu_capability()
    package_file, constants_file = stem + ".pt2", stem + ".constants.safetensors"
    package = stage / package_file
    package.parent.mkdir(parents=True, exist_ok=True)
    mangled = {name.replace(".", "_") for name in fqns}
    configs = inductor_configs(capability, host, threads)
    with (
        _recorded_constants() as recorded,
        _compiler_errors("compiling"),
        _no_leafspec_warning(),
        _no_buffer_copies(),
        _no_input_check_code(),
        _probe_only_the_chosen_isa(),
        _wrapper_beside_the_kernels(),
        _no_machine_paths(),
    ):
        torch._inductor.aoti_compile_and_package(exported, package_path=str(package), inductor_configs=configs)
    _make_reproducible(package)
    made = {
        name: value.detach().clone().contiguous()
        for name, value in recorded.items()
        if name not in fqns and name not in mangled
    }
    save_file(made, str(stage / constants_file), metadata={"format": "pt"})
    seconds = round(time.perf_counter() - started, 3)
    log.info("build.stage", stage="compile", package=package_file, capability=capability, seconds=seconds)
    return Program(package=package_file, constants=constants_file)


def plan_for(model: CausalLM, options: CompileOptions, weight_bytes: int) -> ProgramPlan:
    """Which runs of `model`'s layers share a program (builder/layer_programs.py), for a model
    whose step reads `weight_bytes` of weights, planned for PLANNED_PROCESSES compiling processes."""
    signatures = [layer_signature(layer) for layer in model.model.layers]
    budget = call_budget(weight_bytes)
    select = _lookup_compiles_quickly(model)
    return plan_programs(signatures, budget, options.layers_per_program, PLANNED_PROCESSES, select)


def _lookup_compiles_quickly(model: CausalLM) -> bool:
    """Whether a program embedding the token ids compiles for little more than its layers: a
    float table's lookup or a legacy block format's dequantization (a SmolLM2 program with its q8_0
    table took ~2 s more), not a K-quant's (a 3B program with its q6k table: ~15 s more, for a
    lookup that eagerly costs a step ~250 µs of its ~80 ms; docs/BENCHMARKS.md)."""
    table = model.model.embed_tokens
    return not isinstance(table, QuantEmbedding) or FORMATS[table.fmt].module != "kquants"


def step_jobs(plan: ProgramPlan, forms: list[str], capabilities: list[str]) -> list[Job]:
    """Every program to compile: each of the plan's programs for each weight form and each
    capability."""
    parts = range(len(plan.programs))
    return [(form, capability, part) for form in forms for capability in capabilities for part in parts]


def _export_part(
    model: CausalLM, options: CompileOptions, plan: ProgramPlan, weights: str, part: int
) -> tuple[torch.export.ExportedProgram, PartMeta]:
    """Trace one of the plan's programs computing with `weights`."""
    # The last run's program ends with the logits where no other run shares it (elsewhere the
    # runtime computes them eagerly: a program of their own cost a compile of ~8 s for ~15 µs a
    # step saved). Likewise the first run's program starts from the token ids (the lookup), by a
    # select beside its input where other runs share it.
    layers, module, _ = export_layers(
        model,
        options,
        weights,
        *plan.runs[plan.programs[part]],
        logits=not plan.logits_apart and part == plan.order[-1],
        embed=not plan.first_shared and part == plan.order[0],
        embed_select=plan.embed_select and part == plan.order[0],
        logits_select=plan.logits_select and part == plan.order[-1],
    )
    logits = module.logits is not None and not module.logits_select
    embed = module.embed_tokens is not None and not module.embed_select
    meta = PartMeta(module_fqns(module), len(module.layers), logits, embed, module.embed_select, module.logits_select)
    return layers, meta


def _lowered(
    exported: torch.export.ExportedProgram,
    meta: PartMeta,
    stage: Path,
    weights: str,
    capability: str,
    part: int,
    threads: int,
) -> CompiledPart:
    stem = package_stem(weights, capability, torch.backends.cpu.get_cpu_capability())
    files = lower_program(exported, meta.fqns, stage, f"{stem}.p{part}", capability, threads)
    program = LayerProgram(
        package=files.package,
        constants=files.constants,
        layers=meta.layers,
        logits=meta.logits,
        embed=meta.embed,
        embed_select=meta.embed_select,
        logits_select=meta.logits_select,
    )
    return CompiledPart(weights, capability, part, program, calls_cpu_kernels(exported))


def _job_order(job: Job) -> tuple[str, int, str]:
    """Jobs of one traced program together: it is traced once."""
    weights, capability, part = job
    return (weights, part, capability)


def compile_parts(
    model: CausalLM, options: CompileOptions, stage: Path, plan: ProgramPlan, jobs: list[Job], threads: int
) -> list[CompiledPart]:
    """Export the programs `jobs` name (each weight form's once) and compile each for its CPU
    capability, its loops laid out for `threads` threads, into `stage`."""
    exports: dict[tuple[str, int], tuple[torch.export.ExportedProgram, PartMeta]] = {}
    done = []
    for weights, capability, part in sorted(jobs, key=_job_order):
        if (weights, part) not in exports:
            exports[weights, part] = _export_part(model, options, plan, weights, part)
        exported, meta = exports[weights, part]
        done.append(_lowered(exported, meta, stage, weights, capability, part, threads))
    return done


def assemble_steps(
    plan: ProgramPlan,
    parts: list[CompiledPart],
    buckets: dict[str, list[int]],
    options: CompileOptions,
    spec: ModelSpec,
) -> list[tuple[CompiledStep, list[str]]]:
    """The compiled steps (one per weight form and capability) that `parts` make up, with the
    files each names (relative to the stage)."""
    _, max_seq_len = check_options(options, spec)
    results = []
    for weights, capability in dict.fromkeys((part.weights, part.capability) for part in parts):
        mine = {part.part: part for part in parts if (part.weights, part.capability) == (weights, capability)}
        info = CompiledStep(
            kind="decode",
            programs=[mine[index].program for index in range(len(plan.programs))],
            order=plan.order,
            buckets=buckets[weights],
            max_seq_len=max_seq_len,
            block_size=options.block_size,
            torch_version=torch.__version__.split("+")[0],
            cpu_capability=capability,
            weights=weights,
            cpu_kernels=any(part.cpu_kernels for part in mine.values()),
        )
        results.append((info, info.files()))
    return results


class CpuTarget(Target):
    """llmc's CPU kernel library (compiled on a thread while the weights are written, `start`) and
    the decode step's AOTInductor packages, one per weight form (`finish`)."""

    name = "cpu"
    # On CPUs f32 matmuls are the fast unquantized path (bf16 needs AMX/AVX512-BF16 to pay off).
    default_dtype = "f32"

    def __init__(
        self, compile: CompileOptions | None, kernels: bool, isa: str = DEFAULT_CPU_ISA, autotune: bool = True
    ) -> None:
        self.autotune = autotune  # `--no-autotune`: False
        self.compile = compile  # None: an eager artifact (`--no-compile`)
        self.kernels = kernels  # `--no-cpu-kernels`: False
        self.isa = isa  # `--cpu-isa`
        self._pool: ThreadPoolExecutor | None = None
        self._kernels_jobs: dict[str, Future[bytes]] | str | None = None

    def check(self, spec: ModelSpec) -> None:
        if self.compile is not None:
            check_options(self.compile, spec)
            capabilities(self.isa, torch.backends.cpu.get_cpu_capability())

    def start(self, writer: ArtifactWriter) -> None:
        if self.kernels:
            # One ISA at a time, this machine's first (_start_cpu_kernels).
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmc-kernels")
            self._kernels_jobs = _start_cpu_kernels(self._pool)

    def finish(
        self,
        writer: ArtifactWriter,
        spec: ModelSpec,
        formats: dict[str, str],
        dtype: torch.dtype,
        on_progress: Progress | None,
    ) -> TargetOutput:
        jobs = self._kernels_jobs
        isa, why = None, ""
        if isinstance(jobs, str):
            log.warning("build.cpu_kernels_skipped", reason=jobs)
            jobs = None
        elif jobs is not None:
            chosen = _load_cpu_kernels(writer, jobs)
            if chosen is None:
                jobs = None
            else:
                isa, why = chosen
        loaded = None if isa is None else _library(isa)
        compiled, skipped, seconds = _compile(self.compile, spec, writer, formats, dtype, loaded, on_progress, self.isa)
        kernels = [] if jobs is None else _ship_cpu_kernels(writer, jobs, isa, why)
        if self.autotune:
            # Last: the packages are traced with the default weight forms whatever it measures, and
            # nothing else compiles now to disturb the measurement.
            tune_build_host(writer, dtype, loaded is not None)
        capability = torch.backends.cpu.get_cpu_capability()
        return TargetOutput(TargetCode(capability=capability, kernels=kernels, compiled=compiled), skipped, seconds)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def abort(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)  # a compile under way ends on its own


def tune_build_host(writer: ArtifactWriter, dtype: torch.dtype, kernels_loaded: bool) -> autotune.Tuning:
    """Measure the weight forms of the staged weights on this machine into the user's cache under
    the key `llmc run` computes here (same shapes, CPU, default thread count, kernel library), so
    that serving the artifact here starts without the pause (kernels/cpu/autotune.py)."""
    quantized = {t.name: (t.quant, t.shape) for t in writer.tensors if t.quant}
    files = {t.name: t.file for t in writer.tensors}

    def blocks(name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(writer.stage / files[name]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    isa = cpu_kernels.loaded_variant() if kernels_loaded else None  # the key `llmc run` computes here
    key = autotune.cache_key(autotune.shape_signature(quantized.values()), torch.get_num_threads(), isa, dtype)
    tuning = autotune.tune(key, autotune.groups_from(quantized, blocks, kernels_loaded), dtype)
    log.info("build.weight_forms", **tuning.describe())
    return tuning


def _start_cpu_kernels(pool: ThreadPoolExecutor) -> dict[str, Future[bytes]] | str:
    """Start compiling llmc's CPU kernels for every ISA (into the user's cache), the one this
    machine loads first; or why they cannot be built here. The pool runs them one at a time: the
    first compiles its two sources on two cores while the weights are written, and the compile of
    the decode step, which needs only that one, starts as soon as it is done; the others compile
    beside it (they only go into the artifact), each on one core."""
    isas = cpu_kernels.buildable()
    if not isas:
        return f"llmc's CPU kernels are for x86-64 and aarch64 CPUs ({', '.join(cpu_kernels.ISA_NAMES)})"
    try:
        first, _ = cpu_kernels.choose(isas)
    except LlmcError:  # a bad $LLMC_CPU_ISA: _load_cpu_kernels says so
        first = None
    order = sorted(isas, key=lambda name: name != first)
    return {isa: pool.submit(cpu_kernels.cached_library, isa) for isa in order}


def _library(isa: str) -> KernelLibrary:
    """The manifest entry of the kernel library for `isa`, compiled against this torch."""
    return KernelLibrary(file=kernels_file(isa), torch_version=torch.__version__.split("+")[0], isa=isa)


def _built(name: str, job: Future[bytes]) -> bytes | None:
    """The library a kernel job compiled, or None (logged) when it failed."""
    try:
        return job.result()
    except InternalError as exc:
        log.warning("build.cpu_kernels_skipped", isa=name, reason=str(exc))
        return None


def _load_cpu_kernels(writer: ArtifactWriter, jobs: dict[str, Future[bytes]]) -> tuple[str | None, str] | None:
    """Wait for the library this machine runs best (the next best where one fails to compile),
    load it and copy it into the artifact (the compiled steps then call it): its ISA, or None
    where this machine runs none of them, and why; None when it does not load here, and the
    artifact then ships no library (one that fails here would fail its users too)."""
    candidates = set(jobs)
    while True:
        isa, why = cpu_kernels.choose(candidates)
        if isa is None:
            return None, why
        data = _built(isa, jobs[isa])
        if data is None:
            candidates.discard(isa)
            continue
        reason = cpu_kernels.load_bytes(data, isa)
        if reason is not None:
            log.warning("build.cpu_kernels_skipped", isa=isa, reason=reason)
            return None
        cpu_kernels.install(data, writer.stage / kernels_file(isa))
        return isa, why


def _ship_cpu_kernels(
    writer: ArtifactWriter, jobs: dict[str, Future[bytes]], loaded: str | None, why: str
) -> list[KernelLibrary]:
    """Wait for the other libraries and copy them into the artifact, one per ISA, in ISA order."""
    built = [name for name in cpu_kernels.ISA_NAMES if name in jobs]
    libraries = []
    for name in built:
        if name != loaded:
            data = _built(name, jobs[name])
            if data is None:
                continue
            cpu_kernels.install(data, writer.stage / kernels_file(name))
        libraries.append(_library(name))
        writer.add(kernels_file(name))
    log.info("build.cpu_kernels", isas=sorted(lib.isa for lib in libraries), loaded=loaded, why=why)
    return libraries


def _compile(
    options: CompileOptions | None,
    spec: ModelSpec,
    writer: ArtifactWriter,
    formats: dict[str, str],
    dtype: torch.dtype,
    library: KernelLibrary | None,
    on_progress: Progress | None = None,
    isa: str = DEFAULT_CPU_ISA,
) -> tuple[list[CompiledStep], str | None, float | None]:
    """Compile the decode step from the weights just written, for each CPU capability `isa` asks
    for, calling the CPU kernel `library` loaded here if any, and taking what the user's compile
    cache holds: (manifest entries, why skipped, seconds)."""
    if options is None:
        return [], None, None
    reason = not_compilable(spec)
    if reason is not None:
        log.warning("build.compile_skipped", architecture=spec.architecture, reason=reason)
        return [], reason, None
    started = time.perf_counter()
    host = torch.backends.cpu.get_cpu_capability()
    wanted = capabilities(isa, host)
    threads = torch.get_num_threads()
    kernels_sha256 = None if library is None else hashlib.sha256((writer.stage / library.file).read_bytes()).hexdigest()
    buckets, max_seq_len = check_options(options, spec)
    option_key = {
        "buckets": buckets,
        "max_seq_len": max_seq_len,
        "block_size": options.block_size,
        "layers_per_program": options.layers_per_program,
    }
    keys = {
        cap: compile_cache.cache_key(
            spec, writer.tensors, dtype, option_key, cap, inductor_configs(cap, host, threads), kernels_sha256
        )
        for cap in wanted
    }
    results: list[tuple[CompiledStep, list[str]]] = []
    missing = []
    for cap in wanted:
        hit = _from_cache(keys[cap], writer.stage)
        if hit is None:
            missing.append(cap)
        else:
            results += hit
            log.info("build.compile_cached", capability=cap, key=keys[cap])
    if missing:
        fresh = _compile_packages(options, spec, writer, formats, dtype, library, on_progress, missing, threads)
        for cap in missing:
            _to_cache(keys[cap], writer.stage, [r for r in fresh if r[0].cpu_capability == cap])
        results += fresh
    infos = []
    for info, names in sorted(results, key=lambda r: r[0].programs[0].package):
        for name in names:
            writer.add(name)
        infos.append(info)
        log.info("build.compiled", kind=info.kind, weights=info.weights, capability=info.cpu_capability)
    seconds = time.perf_counter() - started
    log.info("build.compile_done", packages=len(infos), cached=len(wanted) - len(missing), seconds=round(seconds, 3))
    return infos, None, seconds


def _from_cache(key: str, stage: Path) -> list[tuple[CompiledStep, list[str]]] | None:
    """The packages cached under `key`, written into `stage` with their manifest entries."""
    entry = compile_cache.load(key)
    if entry is None:
        return None
    meta, files = entry
    try:
        steps = msgspec.convert(meta["steps"], list[CompiledStep])
        named = [(step, step.files()) for step in steps]
        wanted = {name for _, names in named for name in names}
        if {Path(name).name for name in wanted} != set(files) or len(wanted) != len(files):
            raise ValueError("the entry's files are not its steps' files")
        for name in wanted:
            if not name.startswith(_COMPILED_DIR):
                raise ValueError(f"{name} is not a compiled package's path")
    except (KeyError, ValueError, msgspec.ValidationError) as exc:
        log.warning("compile_cache.unusable", key=key, reason=str(exc))
        return None
    for name in wanted:
        path = stage / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[Path(name).name])
    return named


def _to_cache(key: str, stage: Path, results: list[tuple[CompiledStep, list[str]]]) -> None:
    files = {Path(name).name: (stage / name).read_bytes() for _, names in results for name in names}
    compile_cache.store(key, {"steps": [msgspec.to_builtins(info) for info, _ in results]}, files)


# prctl(2)'s option that names the signal a process gets when its parent dies (<linux/prctl.h>).
_PR_SET_PDEATHSIG = 1
# How long a killed worker gets to be reaped (a SIGKILLed process ends at once; the wait only
# collects its status so that it leaves no zombie behind).
_WORKER_REAP_SECONDS = 5.0


def _start_worker(parent: int, log_level: int) -> None:
    """A compile worker's first act (ProcessPoolExecutor's initializer): die with the build
    (_die_with_parent) and log as it does (its `-v` shows the worker's stages too)."""
    _die_with_parent(parent)
    if log_level:
        configure(logging.getLevelName(log_level))
    _thread_lock_for_tqdm()


def _thread_lock_for_tqdm() -> None:
    """Give tqdm a thread lock before torch's FX interpreter makes a progress bar while tracing:
    tqdm's default lock is a multiprocessing semaphore, and a worker is killed once its results are
    in (_kill_workers), which left that semaphore for Python's resource tracker to report at the
    build's end ("There appear to be 1 leaked semaphore objects"). A worker's bars never leave it."""
    try:
        from tqdm import tqdm
    except ImportError:  # nothing makes the lock then
        return
    tqdm.set_lock(threading.RLock())


def _die_with_parent(parent: int) -> None:
    """A compile worker's first act (ProcessPoolExecutor's initializer): have Linux SIGKILL it
    when the build process dies, however it dies (a SIGKILL, the OOM killer), so that no worker
    outlives its build holding gigabytes. The check after setting it covers a parent that died
    before: the signal is then never sent. Elsewhere than Linux the worker still ends when the
    pool's shutdown (or its broken pipe) tells it to."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """Spawned compile workers (a forked torch may deadlock) that die with the build: with its
    process (_die_with_parent), and on an exception or Ctrl-C in it, when they are killed at once
    instead of being left to finish compiles nobody will use."""
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), logging.getLogger("llmc").level),
    )
    try:
        yield pool
    except BaseException:
        _kill_workers(pool)
        raise
    pool.shutdown()


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Stop `pool`'s workers now, whatever they are doing."""
    # The pool's own map of its live worker processes; the executor has no public kill.
    processes = list((pool._processes or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(_WORKER_REAP_SECONDS)
    log.info("build.compile_workers_stopped", workers=len(processes))


def _warm_worker(stage: Path, library: KernelLibrary | None) -> None:
    """A compile worker's start, done while the parent rebuilds the model: importing torch and
    this module (unpickling this function's reference does that) and loading the kernel library."""
    if library is not None:
        cpu_kernels.load(stage / library.file, library.isa)


def _may_split(
    options: CompileOptions, spec: ModelSpec, formats: dict[str, str], weight_bytes: int, capabilities: list[str]
) -> bool:
    """Whether a build may compile in more than one process: where more than one capability is
    wanted, or its step may be more than one program (the user's runs; layers of more than one
    form; or alike layers that the plan, computed here as plan_for will, splits over two
    programs). A worker started for nothing costs a build on two cores its imports' ~2.5 CPU
    seconds beside the kernel libraries' compiles; one not started costs those seconds later, and
    a dense weight form, found later, may still start one."""
    if options.layers_per_program or len(capabilities) > 1:
        return True
    budget = call_budget(weight_bytes)
    if budget < CALL_SECONDS:
        return False
    if not _layers_alike(spec, formats):
        return True
    embedding = formats.get("model.embed_tokens.weight", "")
    select = embedding not in FORMATS or FORMATS[embedding].module != "kquants"  # as _lookup_compiles_quickly
    plan = plan_programs([None] * spec.num_layers, budget, None, PLANNED_PROCESSES, select)
    return len(plan.programs) > 1


_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _layers_alike(spec: ModelSpec, formats: dict[str, str]) -> bool:
    """Whether every decoder layer has the same tensors in the same formats and the same kind of
    attention and MLP: then they trace to programs of one form (layer_signature), which is known
    here before the model is built."""
    tensors: list[set[tuple[str, str]]] = [set() for _ in range(spec.num_layers)]
    for name, fmt in formats.items():
        match = _LAYER_TENSOR.fullmatch(name)
        if match is not None and int(match.group(1)) < spec.num_layers:
            tensors[int(match.group(1))].add((match.group(2), fmt))
    kinds = {
        (
            frozenset(layer),
            spec.layer_types[i] if spec.layer_types else None,
            i in spec.moe_layers if spec.moe_layers is not None else None,
        )
        for i, layer in enumerate(tensors)
    }
    return len(kinds) == 1


def _compile_packages(
    options: CompileOptions,
    spec: ModelSpec,
    writer: ArtifactWriter,
    formats: dict[str, str],
    dtype: torch.dtype,
    library: KernelLibrary | None,
    on_progress: Progress | None,
    wanted: list[str],
    threads: int,
) -> list[tuple[CompiledStep, list[str]]]:
    """Compile every weight form's programs for the `wanted` capabilities, spread over this
    process and spawned workers (layer_programs.schedule): each process traces a form's programs
    once and compiles them for each capability it was given."""
    started = time.perf_counter()
    files = writer.staged_tensor_files()
    weight_bytes = sum((writer.stage / file).stat().st_size for file in files)
    cores = os.cpu_count() or 1
    parts: list[CompiledPart] = []
    with contextlib.ExitStack() as stack:
        # Compiling is mostly single-threaded Python (tracing, lowering), so programs compile in
        # spawned processes at the same time (spawned: a forked torch may deadlock); each process
        # traces its programs again, which pays only with a second core. A worker that may be
        # needed starts now: its imports (~4 s) overlap this process's model rebuild.
        pool = None
        if cores >= 2 and _may_split(options, spec, formats, weight_bytes, wanted):
            pool = stack.enter_context(_worker_pool(cores - 1))
            pool.submit(_warm_worker, writer.stage, library)
        model = model_from_stage(writer.stage, files, spec, formats, dtype, options, library)
        log.info("build.stage", stage="compile_model", seconds=round(time.perf_counter() - started, 3))
        buckets = weight_forms(model, options)
        plan = plan_for(model, options, weight_bytes)
        jobs = step_jobs(plan, list(buckets), wanted)
        program_costs = plan.program_costs()
        bins = schedule([program_costs[part] for _, _, part in jobs], cores)
        workers = [[jobs[j] for j in jobs_of] for jobs_of in bins[1:] if jobs_of]
        log.info(
            "build.layer_programs",
            runs=plan.runs,
            order=plan.order,
            programs=len(plan.programs),
            embed_select=plan.embed_select,
            eager_embed=plan.embed_apart,
            eager_logits=plan.eager_logits,
            logits_select=plan.logits_select,
            calls=plan.calls,
            processes=1 + len(workers),
        )

        def report(done: int) -> None:
            if on_progress is not None:
                on_progress("compiling the decode step", done, len(jobs))

        report(0)
        if pool is not None and not workers:
            _kill_workers(pool)  # started for nothing: not left to finish its imports
        elif pool is None and workers:
            pool = stack.enter_context(_worker_pool(len(workers)))
        futures = []
        if pool is not None and workers:
            futures = [
                pool.submit(
                    compile_in_worker, writer.stage, files, spec, formats, dtype, options, library, plan, mine, threads
                )
                for mine in workers
            ]
        parts += compile_parts(model, options, writer.stage, plan, [jobs[j] for j in bins[0]], threads)
        report(len(parts))
        del model  # the weights read back: not held while the others finish
        for future in futures:
            parts += future.result()
            report(len(parts))
        if pool is not None:
            _kill_workers(pool)  # done: not waited for while torch tears down (~2 s)
    return assemble_steps(plan, parts, buckets, options, spec)
