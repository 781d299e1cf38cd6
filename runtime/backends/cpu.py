"""The CPU backend: the KV cache in anonymous memory, quantized weights in the layouts of
kernels/cpu/qmatmul_cpu.py (with dense copies where this host measured them faster for the batches
served and memory allows, kernels/cpu/autotune.py), llmc's CPU kernel library when the artifact has
one that runs here, and the artifact's AOTInductor packages as its compiled steps."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from llmc.artifacts.manifest import CompiledStep, Manifest, ModelSpec, capability_rank
from llmc.artifacts.reader import Artifact
from llmc.kernels.cpu import autotune, cpu_kernels, qmatmul_vnni
from llmc.kernels.cpu.half_matmul import CpuHalfMatmul
from llmc.kernels.cpu.qmatmul_cpu import DEFAULT_PLAN, DENSE_MIN_ROWS, SMALL_FORMS, CpuQMatmul, DensePlan
from llmc.kernels.cpu.rms_norm import use_cpu_rms_norm
from llmc.kernels.paged_attention import PagedAttention
from llmc.logs import get_logger
from llmc.model.decode_step import DecodeStep
from llmc.model.decoder import COMPUTE_DTYPES, CausalLM, DeviceKernels, build_model
from llmc.model.half_linear import WidenedLinear
from llmc.model.kv_layout import KVCaches, allocate_kv_caches
from llmc.quant.formats import stored_format
from llmc.runtime.backends.aoti_step import AOTInductorStep
from llmc.runtime.backends.base import BackendOptions
from llmc.runtime.backends.torch_base import TorchBackend
from llmc.runtime.bucketed_step import BucketedStep
from llmc.runtime.resident import drop_range, file_mappings

log = get_logger("llmc.engine")
compiled_log = get_logger("llmc.compiled")

# Dense copies of the quantized weights make prefill and big batches faster on many CPUs
# (kernels/cpu/qmatmul_cpu.py) at 2 or 4 bytes per weight; by default they are kept where measured
# faster and they take at most this share of the machine's memory, which leaves the rest for the
# KV cache and other processes.
DENSE_COPY_MEMORY_SHARE = 0.25


def physical_memory() -> int | None:
    """The machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# madvise(2)'s MADV_POPULATE_WRITE (Linux 5.14; Python's mmap module may not name it): fault a
# range in, writable and zeroed, without the process touching it.
MADV_POPULATE_WRITE = 23
# The KV cache is prefaulted only while it takes at most this share of the memory available then:
# a cache sized beyond what the machine can hold stays lazy (its pages come as they are used).
PREFAULT_MEMORY_SHARE = 0.5


def available_memory() -> int | None:
    """Bytes the OS could give this process now without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Bytes populated per madvise call: the call holds the process's memory-map lock (for reading),
# which blocks every mmap/munmap of the other threads (the HTTP server's start, torch's large
# allocations) until it returns; 32 MiB holds it ~10 ms where 1 GiB held it 0.3 s.
PREFAULT_CHUNK_BYTES = 32 << 20


def _populate(memory: torch.UntypedStorage) -> None:
    """Holds `memory` until done: the cache cannot be unmapped (and its addresses reused by
    another mapping, which this would then fault in) while it populates."""
    started = time.perf_counter()
    address, nbytes = memory.data_ptr(), memory.nbytes()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for offset in range(0, nbytes, PREFAULT_CHUNK_BYTES):
        if libc.madvise(address + offset, min(PREFAULT_CHUNK_BYTES, nbytes - offset), MADV_POPULATE_WRITE) != 0:
            reason = os.strerror(ctypes.get_errno())
            log.info("engine.kv_prefault_skipped", reason=f"madvise(MADV_POPULATE_WRITE): {reason}")
            return
    log.info("engine.kv_prefaulted", mb=nbytes // 2**20, seconds=round(time.perf_counter() - started, 3))


def prefault_kv(memory: torch.UntypedStorage) -> threading.Thread | None:
    """Fault the KV cache's pages in on a thread of its own, as llama.cpp clears its cache at
    start: served lazily, each block's first use faulted its pages inside a step, on both compute
    threads at once, which contend in the kernel (1 GiB: 1.3 s touched by two threads against 0.3 s
    populated by one; a 3B prefill of 512 tokens on fresh blocks 4 % slower, docs/BENCHMARKS.md).
    The server serves meanwhile: a step that meets a page not yet populated faults it as before.
    None where nothing is started (not an mmap'd cache, or more than PREFAULT_MEMORY_SHARE of the
    memory available now)."""
    address, nbytes = memory.data_ptr(), memory.nbytes()
    if nbytes == 0 or address % mmap.PAGESIZE != 0 or not sys.platform.startswith("linux"):
        return None
    available = available_memory()
    if available is None or nbytes > PREFAULT_MEMORY_SHARE * available:
        log.info("engine.kv_prefault_skipped", reason="the cache is large for the memory available now",
                 mb=nbytes // 2**20, available_mb=None if available is None else available // 2**20)  # fmt: skip
        return None
    thread = threading.Thread(target=_populate, args=(memory,), name="llmc-kv-prefault", daemon=True)
    thread.start()
    return thread


def load_cpu_kernels(artifact: Artifact) -> bool:
    """Load the best of the artifact's CPU kernel libraries (one per ISA) that this CPU runs, or the
    one $LLMC_CPU_ISA names (BadInputError where this CPU lacks it), into this process; False (with
    a warning saying why, when the artifact has any) where the model must use torch's kernels."""
    libraries = artifact.manifest.kernels_for("cpu")
    if not libraries:
        return False
    torch_version = torch.__version__.split("+")[0]
    usable = {library.isa: library for library in libraries if library.torch_version == torch_version}
    isa, why = cpu_kernels.choose(usable)
    if isa is None:
        reason: str | None = why
        if not usable:
            reason = f"they were compiled for torch {libraries[0].torch_version}, this is torch {torch_version}"
    else:
        # Loaded from the very bytes whose sha256 was checked (the manifest lists the file: validate).
        reason = cpu_kernels.load_bytes(artifact.read_verified(usable[isa].file), isa)
    if reason is not None:
        log.warning("engine.cpu_kernels_not_used", reason=reason)
        return False
    log.info("engine.cpu_kernels", isa=isa, why=why, available=sorted(usable))
    return True


def forms_of(manifest: Manifest, kernels_loaded: bool) -> dict[str, int]:
    """The number of weights per small-batch form (qmatmul_cpu.SMALL_FORMS) the artifact's
    quantized tensors take here: what the dense copies of each form would hold."""
    counts: dict[str, int] = {}
    for t in manifest.tensors:
        if t.quant:
            form = CpuQMatmul.form_for(t.quant, t.shape[0], kernels_loaded)
            counts[form] = counts.get(form, 0) + t.shape[0] * stored_format(t.quant).cols(t.shape[1])
    return counts


def choose_plan(options: BackendOptions, artifact: Artifact, kernels_loaded: bool) -> autotune.Tuning:
    """Which dense copies to keep and from how many rows to use them: measured on this host
    (or cached, kernels/cpu/autotune.py) unless `--no-autotune`, then cut to the batches the
    server runs and the memory (`fit`); `--dense-weights` keeps copies of every form whatever
    the memory, `--no-dense-weights` none; where the kernel's AMX bf16 path runs, the kernel's
    weights keep none unless asked."""
    flags = cpu_kernels.effective_cpu_flags()
    if options.dense_weights is False:
        return autotune.Tuning(autotune.NO_DENSE, "off")
    if options.autotune:
        manifest = artifact.manifest
        quantized = {t.name: (t.quant, t.shape) for t in manifest.tensors if t.quant}
        dtype = COMPUTE_DTYPES[manifest.dtype]
        signature = autotune.shape_signature(quantized.values())
        isa = cpu_kernels.loaded_variant() if kernels_loaded else None  # AMX changes what wins
        key = autotune.cache_key(signature, torch.get_num_threads(), isa, dtype)
        lazy = artifact.lazy_weights()
        groups = autotune.groups_from(quantized, lambda name: lazy[name], kernels_loaded)
        tuning = autotune.tune(key, groups, dtype, flags)
    else:
        tuning = autotune.Tuning(autotune.default_plan(flags), "defaults")
    plan = tuning.plan
    if options.dense_weights is None and kernels_loaded and qmatmul_vnni.bf16_path_available():
        # Where the kernel's AMX bf16 path runs, it takes the many-row matmuls of the kernel's
        # weights without a copy: SmolLM2's prefill measured the same with and without its copies
        # (within this machine's noise), with 260 MB less resident and ~1 s sooner ready
        # (docs/BENCHMARKS.md). `--dense-weights` keeps them.
        plan = replace(plan, kernel=None)
    if options.dense_weights:
        # Asked for: every form keeps a copy, from the measured threshold or the default one.
        thresholds = {f: plan.from_rows(f) or DEFAULT_PLAN.from_rows(f) for f in SMALL_FORMS}
        plan = DensePlan(**thresholds, dtype=plan.dtype)
    else:
        weights = forms_of(artifact.manifest, kernels_loaded)
        max_rows = options.max_rows if options.max_rows is not None else sys.maxsize  # None: no bound
        plan = autotune.fit(plan, weights, max_rows, physical_memory(), DENSE_COPY_MEMORY_SHARE)
    return autotune.Tuning(plan, tuning.source, tuning.timings_ms)


def incompatibility(info: CompiledStep, block_size: int, cpu_kernels: bool = False) -> str | None:
    """Why this process cannot run the compiled step, or None when it can; `cpu_kernels`: the model
    computes with the artifact's CPU kernel library. A package for another torch or another CPU
    capability is never loaded: a wrong-ISA kernel would crash the process."""
    torch_version = torch.__version__.split("+")[0]
    if info.torch_version != torch_version:
        return f"it was compiled with torch {info.torch_version}, this is torch {torch_version}; rebuild the artifact"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability_rank(info.cpu_capability, capability) is None:
        return f"it was compiled for a {info.cpu_capability} CPU, this one is {capability}; rebuild it here"
    if info.block_size != block_size:
        return f"it was traced for KV blocks of {info.block_size} tokens, the engine uses {block_size}"
    if info.cpu_kernels and not cpu_kernels:
        return "it calls the artifact's CPU kernels, which this process runs without (see the warning before)"
    return None


def release_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the pages a memory-mapped weight was read through from this process's resident set.

    Quantized weights are read once, to build the matmul's prepared form (a CPU-specific layout,
    a copy), and the pages read stay resident while the file is mapped, so RSS at ready would hold
    every quantized weight twice. The data stays mapped: a later read faults it back in from the
    page cache (a lookup in a quantized embedding touches a few rows). Only whole pages inside the
    tensor are dropped, and only read-only use is made of these blocks (never written in place,
    which on a private mapping MADV_DONTNEED would undo). `mapped`: the address ranges of the
    artifact's files (file_mappings); a tensor outside them (copied into anonymous memory, whose
    pages MADV_DONTNEED would zero) is left alone."""
    if tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if any(low <= start and end <= high for low, high in mapped):
        drop_range(start, end)


def _pair_copies(model: torch.nn.Module) -> bool:
    """Whether some int4 pair of `model` keeps a dense copy: what the "dense" package computes with."""
    return any(isinstance(m, CpuQMatmul) and m.form == "pair" and m.dense is not None for m in model.modules())


def _rank(info: CompiledStep, host: str) -> int:
    return capability_rank(info.cpu_capability, host) or 0


def _zeroed(numel: int, dtype: torch.dtype, huge_pages: bool = False) -> torch.Tensor:
    """`numel` zeros in fresh anonymous memory, which the OS zeroes page by page when first touched:
    a 1 GiB cache costs nothing at startup (torch.zeros writes it all, ~0.3 s here), and
    prefault_kv then faults it in off the critical path. The tensor keeps the mapping alive.

    `huge_pages`: ask for 2 MiB pages (MADV_HUGEPAGE). Attention gathers slots from all over the
    cache and huge pages keep those reads from missing the TLB (16 sequences at 1024 tokens in
    scattered blocks: 6-8 % faster decode), but where THP defrag is `madvise` the kernel compacts
    memory on each first touch: 1.1-2.3 ms per MB against 0.3 for small pages, which made a fresh
    server's 16-client round 8-10 % slower (docs/BENCHMARKS.md). Hence opt-in."""
    nbytes = numel * dtype.itemsize
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(numel, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype)


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        if options.threads:
            torch.set_num_threads(options.threads)
        self.dense_copies = False  # load_model decides, from measurements and the artifact's size
        self.tuning = autotune.Tuning(autotune.NO_DENSE, "off")
        self.kernels_loaded = False  # the artifact's CPU kernel library runs in this process
        self._kv_memory: torch.UntypedStorage | None = None  # allocate_kv's, the whole cache
        self.prefault_thread: threading.Thread | None = None  # ready()'s, while it faults the cache in

    def allocate_kv(self, spec: ModelSpec, dtype: torch.dtype, num_slots: int) -> KVCaches:
        huge = self.options.kv_huge_pages
        caches = allocate_kv_caches(spec, dtype, num_slots, lambda numel, dt: _zeroed(numel, dt, huge))
        self._kv_memory = caches[0][0].untyped_storage()  # every layer's cache is a view of it
        return caches

    def ready(self) -> None:
        """Fault the KV cache in now, not while loading: concurrent with the load (which faults in
        the weights' forms) it made a 3B server ready 1.3 s later (docs/BENCHMARKS.md)."""
        if self.options.kv_prefault and self._kv_memory is not None:
            self.prefault_thread = prefault_kv(self._kv_memory)

    def load_model(self, artifact: Artifact, max_positions: int, dtype: torch.dtype) -> CausalLM:
        manifest = artifact.manifest
        quant = {t.name: t.quant for t in manifest.tensors if t.quant is not None}
        self.kernels_loaded = load_cpu_kernels(artifact)
        loaded = self.kernels_loaded  # quantized layers take llmc's matmul, decode attention the paged kernel
        self.tuning = choose_plan(self.options, artifact, loaded)
        plan = self.tuning.plan
        self.dense_copies = any(plan.from_rows(form) is not None for form in SMALL_FORMS)
        log.info("engine.weight_forms", **self.tuning.describe())
        kernels = DeviceKernels(
            matmul=partial(CpuQMatmul, dense_copy=self.dense_copies, cpu_kernels=loaded, plan=plan),
            attention=PagedAttention(cpu_kernel=loaded),
            half_matmul=CpuHalfMatmul if loaded else WidenedLinear,
            prepare_norms=use_cpu_rms_norm if loaded else None,
        )
        weights = dict(artifact.weights())  # memory-mapped from the artifact, not copied
        model = build_model(manifest.model, weights, max_positions, quant, dtype, kernels)
        mapped = file_mappings({str(artifact.path(t.file)) for t in manifest.tensors})
        for name in quant:  # their prepared forms are what runs now: the blocks need not stay resident
            release_pages(weights[name], mapped)
        return model

    def load_steps(self, artifact: Artifact, step: DecodeStep, num_slots: int) -> list[BucketedStep]:
        """For each weight form, the package for the best CPU capability this host runs (an
        artifact may carry one for its build host and one for a baseline ISA)."""
        host = torch.backends.cpu.get_cpu_capability()
        best: dict[str, CompiledStep] = {}
        for info in artifact.manifest.compiled_for("cpu"):
            if info.kind != "decode":
                continue
            if info.weights == "dense" and (self.dense_package_from() is None or not _pair_copies(step.model)):
                continue  # a "dense" package also needs the model's bf16 dense copies of its int4 pairs
            reason = incompatibility(info, step.block_size, self.kernels_loaded)
            if reason is not None:
                compiled_log.warning("compiled.not_used", kind=info.kind, weights=info.weights, reason=reason)
                continue
            chosen = best.get(info.weights)
            if chosen is None or _rank(info, host) > _rank(chosen, host):
                best[info.weights] = info
        steps: list[BucketedStep] = []
        for info in best.values():
            compiled_log.info("compiled.chosen", weights=info.weights, capability=info.cpu_capability, host=host)
            loaded = AOTInductorStep.load(artifact, info, step, num_slots)
            if loaded is not None:
                steps.append(loaded)
        return steps

    def dense_package_from(self) -> int | None:
        """From how many sequences the "dense" package runs, or None: never.

        The package was traced at build with the forms DENSE_MIN_ROWS rows take by the default plan
        (int4 pairs dense, every other form packed), with bf16 copies. It computes the same values
        as eager execution whatever the batch, but it is only faster where this host measured the
        pairs' dense copies faster: so from the measured pair threshold (never below DENSE_MIN_ROWS,
        the batches it was traced for), and never where the copies kept here are not bf16 or the
        pairs keep none (then the package's constants would not match ours)."""
        plan = self.tuning.plan
        if plan.pair is None or plan.dtype != DEFAULT_PLAN.dtype:
            return None
        return max(plan.pair, DENSE_MIN_ROWS)

    def choose_step(self, steps: list[BucketedStep], batch: int, max_context: int) -> BucketedStep | None:
        """The dense package from dense_package_from() sequences on (where eager execution also
        takes the pairs' dense copies), else the packed one."""
        usable = {s.info.weights: s for s in steps if s.accepts(batch, max_context)}
        dense_from = self.dense_package_from()
        if dense_from is not None and batch >= dense_from and "dense" in usable:
            return usable["dense"]
        return usable.get("packed")

    def describe(self) -> dict[str, Any]:
        isa = cpu_kernels.loaded_isa() if self.kernels_loaded else None
        return {
            **super().describe(),
            "dense_weights": self.dense_copies,
            "weight_forms": self.tuning.describe(),
            "cpu_kernels": self.kernels_loaded,
            "cpu_isa": isa,
            "cpu_amx": self.kernels_loaded and cpu_kernels.uses_amx(),
            "cpu_prefetch": cpu_kernels.prefetch_cache() if self.kernels_loaded else None,
        }
