"""`llmc build`: source → normalised spec → weights in the target dtype → artifact directory."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

import llmc
from llmc.artifacts import generation
from llmc.artifacts.files import sha256_file
from llmc.artifacts.inspect import describe_mix, parameter_count, weight_mix
from llmc.artifacts.manifest import (
    FORMAT_VERSION,
    BuildInfo,
    CompiledStep,
    CpuKernels,
    FileInfo,
    Manifest,
    ModelSpec,
    SourceInfo,
    TokenizerInfo,
)
from llmc.artifacts.staging import check_output
from llmc.artifacts.writer import CHAT_TEMPLATE_FILE, TOKENIZER_FILE, ArtifactWriter
from llmc.builder.arch import TensorSource, spec_from_config, tensor_plan
from llmc.builder.compile_step import (
    CompileOptions,
    check_options,
    compile_decode_step,
    compile_from_stage,
    model_from_stage,
    not_compilable,
    weight_forms,
)
from llmc.builder.quant_plan import QuantChoice, plan_quantization, runs_quantized
from llmc.builder.quant_report import REPORT_FILE, QuantReport
from llmc.builder.sources import ModelSource, open_source
from llmc.errors import BadInputError, BadModelError, InternalError
from llmc.kernels import cpu_kernels
from llmc.kernels.quant_formats import FORMATS
from llmc.logs import get_logger
from llmc.model.decoder import CausalLM

log = get_logger("llmc.builder")

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TARGETS = ("cpu",)
KERNELS_FILE = "kernels/" + cpu_kernels.LIBRARY_NAME


@dataclass(frozen=True)
class BuildOptions:
    model: str | None
    gguf_file: str | None
    weights: str | None
    output: Path
    dtype: str = "auto"
    target: str = "cpu"
    name: str | None = None
    # None: keep a GGUF source's quantized blocks; "none": dequantize everything; else a format.
    isq: str | None = None
    # Compile the decode step ahead of time (None: an eager artifact, `llmc build --no-compile`).
    compile: CompileOptions | None = None
    # Ship llmc's CPU kernels with the artifact (`--no-cpu-kernels`: torch's kernels only).
    cpu_kernels: bool = True
    # `--generation-config`: inline JSON or a JSON file whose sampling settings override the
    # source's (artifacts/generation.py).
    generation_config: str | None = None


@dataclass(frozen=True)
class BuildResult:
    output: Path
    manifest: Manifest
    seconds: float
    report: QuantReport | None = None
    compile_skipped: str | None = None  # why a requested compile did not happen
    compile_seconds: float | None = None

    def summary(self) -> dict[str, object]:
        m = self.manifest
        mix = weight_mix(m)
        return {
            "ok": True,
            "output": str(self.output),
            "model_name": m.model_name,
            "architecture": m.model.architecture,
            "dtype": m.dtype,
            "target": m.target,
            "format_version": m.format_version,
            "parameters": parameter_count(m),
            "weights": describe_mix(mix),
            "weight_formats": mix,
            "tensors": len(m.tensors),
            "bytes": sum(f.size for f in m.files),
            "files": {f.path: f.sha256 for f in m.files},
            "seconds": round(self.seconds, 3),
            "quantization": self.report.summary() if self.report is not None else None,
            "compiled": [
                {
                    "kind": c.kind,
                    "target": c.target,
                    "weights": c.weights,
                    "buckets": c.buckets,
                    "max_seq_len": c.max_seq_len,
                }
                for c in m.compiled
            ],
            "compile_seconds": None if self.compile_seconds is None else round(self.compile_seconds, 3),
            "compile_skipped": self.compile_skipped,
        }


def _resolve_dtype(option: str, target: str) -> str:
    if option != "auto":
        if option not in DTYPES:
            raise BadInputError(f"--dtype {option!r} is not one of auto, {', '.join(DTYPES)}")
        return option
    # On CPUs f32 matmuls are the fast unquantized path (bf16 needs AMX/AVX512-BF16 to pay off).
    return "f32" if target == "cpu" else "bf16"


def _expected_shapes(source: ModelSource) -> dict[str, list[int]]:
    spec = spec_from_config(source.config)
    with torch.device("meta"):
        model = CausalLM(spec, max_positions=1)
    return {name: list(p.shape) for name, p in model.named_parameters(remove_duplicate=True)}


# on_progress(what, done, total): a phase's label ("quantizing weights", "compiling the decode
# step") and how far it got; the CLI draws it as a progress bar on a terminal.
Progress = Callable[[str, int, int], None]


def build(options: BuildOptions, on_progress: Progress | None = None) -> BuildResult:
    started = time.perf_counter()
    if options.target not in TARGETS:
        raise BadInputError(f"--target {options.target!r} is not supported; supported: {', '.join(TARGETS)}")
    check_output(options.output.resolve())  # refuse someone else's folder before the slow part
    generation_flag = generation.load_arg(options.generation_config) if options.generation_config else {}
    dtype_name = _resolve_dtype(options.dtype, options.target)
    dtype = DTYPES[dtype_name]
    source = open_source(options.model, options.gguf_file, options.weights)
    spec = spec_from_config(source.config)
    if options.compile is not None:
        check_options(options.compile, spec)  # fail on bad flags before the slow part
    expected = _expected_shapes(source)
    available = source.tensors()
    plan = tensor_plan(spec, sorted(available))
    if spec.tie_word_embeddings:
        plan.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(plan))
    unexpected = sorted(set(plan) - set(expected))
    if missing or unexpected:
        raise BadModelError(
            f"model tensors do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        ref = plan[name]
        got = list(available[ref.name].shape)
        if ref.rows is not None:
            got[0] = ref.rows[1] - ref.rows[0]
        if ref.stack is not None:
            got = [len(ref.stack), sum(available[n].shape[0] for n in ref.stack[0]), *got[1:]]
        if got != shape:
            raise BadModelError(f"tensor {name} has shape {got}, its config implies {shape}")

    def load_float(name: str) -> torch.Tensor:
        ref = plan[name]
        if ref.stack is not None:
            return torch.stack([torch.cat([source.load(n) for n in group]) for group in ref.stack])
        tensor = source.load(ref.name)
        if ref.rows is not None:
            tensor = tensor[ref.rows[0] : ref.rows[1]]
        return tensor

    choices = _choose_formats(options.isq, spec, expected, plan, source)
    formats = {name: choice.format for name, choice in choices.items() if choice.format is not None}
    report = QuantReport(dtype_name) if formats else None

    def load(name: str) -> torch.Tensor:
        fmt = formats.get(name)
        if fmt is None:
            return load_float(name).to(dtype)
        assert report is not None
        ref = plan[name]
        if ref.rows is None and ref.stack is None and source.block_format(ref.name) == fmt:
            carried = source.blocks(ref.name)
            report.add(name, choices[name], expected[name], carried, None)
            return carried
        weight = load_float(name).float()
        blocks = FORMATS[fmt].quantize(weight)
        report.add(name, choices[name], expected[name], blocks, weight)
        return blocks

    log.info("build.source", kind=source.kind, name=source.name, architecture=spec.architecture, dtype=dtype_name)

    writer = ArtifactWriter(options.output)
    # The kernel library compiles (a C++ compiler process, on a thread) while the weights are written.
    kernels_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmc-kernels")
    try:
        done = 0
        total = len(expected)
        label = "writing weights" if options.isq in (None, "none") else "quantizing weights"

        def tick(_name: str) -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(label, done, total)

        stored = {
            name: (torch.uint8, [shape[0], FORMATS[formats[name]].row_bytes(shape[1])])
            if name in formats
            else (dtype, shape)
            for name, shape in expected.items()
        }
        want_kernels = options.cpu_kernels and options.target == "cpu"
        kernels_job = _start_cpu_kernels(kernels_pool) if want_kernels else None
        writer.write_weights(stored, load, on_tensor=tick, quant=formats)
        if report is not None:
            writer.write_bytes(REPORT_FILE, report.encode())
        kernels = _finish_cpu_kernels(writer, kernels_job) if kernels_job is not None else None
        compiled, compile_skipped, compile_seconds = _compile(
            options.compile, spec, writer, formats, dtype, kernels, on_progress
        )
        tok = source.tokenizer
        writer.write_bytes(TOKENIZER_FILE, tok.tokenizer_json)
        if tok.chat_template is not None:
            writer.write_bytes(CHAT_TEMPLATE_FILE, tok.chat_template.encode("utf-8"))
        defaults = generation.override(
            generation.from_source(
                source.generation_config, generation.GGUF_SAMPLING_ORIGIN if source.kind == "gguf" else None
            ),
            generation_flag,
            "--generation-config",
        )
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            model_name=options.name or _default_name(source.name),
            target=options.target,
            dtype=dtype_name,
            model=spec,
            tokenizer=TokenizerInfo(
                file=TOKENIZER_FILE,
                chat_template_file=CHAT_TEMPLATE_FILE if tok.chat_template is not None else None,
                bos_token=tok.bos_token,
                eos_token=tok.eos_token,
                eos_token_ids=tok.eos_token_ids,
                add_bos_token=tok.add_bos_token,
            ),
            generation=defaults,
            tensors=writer.tensors,
            files=writer.file_infos(),
            build=BuildInfo(
                llmc_version=llmc.__version__,
                source=SourceInfo(
                    kind=source.kind,
                    name=source.name,
                    files=[_input_file_info(p) for p in source.input_files],
                ),
                flags={
                    "dtype": dtype_name,
                    "target": options.target,
                    "isq": options.isq,
                    "compile": None if options.compile is None else _compile_flags(options.compile),
                    "cpu_kernels": options.cpu_kernels,
                },
                torch_version=torch.__version__.split("+")[0],
                report_file=REPORT_FILE if report is not None else None,
            ),
            compiled=compiled,
            cpu_kernels=kernels,
        )
        writer.commit(manifest)
    except BaseException:
        kernels_pool.shutdown(wait=False, cancel_futures=True)  # a compile under way ends on its own
        writer.abort()
        raise
    kernels_pool.shutdown()
    seconds = time.perf_counter() - started
    log.info("build.done", output=str(options.output), seconds=round(seconds, 3))
    return BuildResult(options.output, manifest, seconds, report, compile_skipped, compile_seconds)


def _compile_flags(options: CompileOptions) -> dict[str, object]:
    return {"buckets": list(options.buckets), "max_seq_len": options.max_seq_len, "block_size": options.block_size}


def _start_cpu_kernels(pool: ThreadPoolExecutor) -> Future[bytes] | str:
    """Start compiling llmc's CPU kernels (into the user's cache); or why they cannot run here."""
    reason = cpu_kernels.unsupported()
    if reason is not None:
        return reason
    return pool.submit(cpu_kernels.cached_library)


def _finish_cpu_kernels(writer: ArtifactWriter, job: Future[bytes] | str) -> CpuKernels | None:
    """Wait for the kernels, copy them into the artifact and load them here (the compiled steps then
    call them), or None where this machine cannot compile or run them: the artifact then uses
    torch's own kernels."""
    reason = job if isinstance(job, str) else None
    staged = writer.stage / KERNELS_FILE
    library = b""
    if isinstance(job, Future):
        try:
            library = job.result()
            cpu_kernels.install(library, staged)
        except InternalError as exc:
            reason = str(exc)
    if reason is None:
        reason = cpu_kernels.load_bytes(library)
    if reason is not None:
        staged.unlink(missing_ok=True)  # an artifact holds no file its manifest does not list
    if reason is not None:
        log.warning("build.cpu_kernels_skipped", reason=reason)
        return None
    writer.add(KERNELS_FILE)
    return CpuKernels(file=KERNELS_FILE, torch_version=torch.__version__.split("+")[0], isa=cpu_kernels.ISA)


def _compile(
    options: CompileOptions | None,
    spec: ModelSpec,
    writer: ArtifactWriter,
    formats: dict[str, str],
    dtype: torch.dtype,
    kernels: CpuKernels | None,
    on_progress: Progress | None = None,
) -> tuple[list[CompiledStep], str | None, float | None]:
    """Compile the decode step from the weights just written: (manifest entries, why skipped, seconds)."""
    if options is None:
        return [], None, None
    reason = not_compilable(spec)
    if reason is not None:
        log.warning("build.compile_skipped", architecture=spec.architecture, reason=reason)
        return [], reason, None
    started = time.perf_counter()
    files = writer.staged_tensor_files()
    kernels_file = None if kernels is None else kernels.file
    model = model_from_stage(writer.stage, files, spec, formats, dtype, options, kernels_file)
    first, *others = weight_forms(model, options)
    results: list[tuple[CompiledStep, list[str]]] = []

    def report(done: int) -> None:
        if on_progress is not None:
            on_progress("compiling the decode step", done, 1 + len(others))

    report(0)
    # Compiling is mostly single-threaded Python (tracing, lowering), so the other weight forms
    # compile in spawned processes at the same time (spawned: a forked torch may deadlock).
    workers = min(len(others), max(1, (os.cpu_count() or 1) - 1))
    with contextlib.ExitStack() as stack:
        futures = []
        if others:
            pool = stack.enter_context(
                ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            )
            futures = [
                pool.submit(compile_from_stage, writer.stage, files, spec, formats, dtype, options, form, kernels_file)
                for form in others
            ]
        results.append(compile_decode_step(model, options, writer.stage, first))
        report(len(results))
        for future in futures:
            results.append(future.result())
            report(len(results))
    infos = []
    for info, names in results:
        for name in names:
            writer.add(name)
        infos.append(info)
        log.info("build.compiled", kind=info.kind, weights=info.weights, buckets=info.buckets)
    seconds = time.perf_counter() - started
    log.info("build.compile_done", packages=len(infos), seconds=round(seconds, 3))
    return infos, None, seconds


def _choose_formats(
    isq: str | None,
    spec: ModelSpec,
    expected: dict[str, list[int]],
    plan: dict[str, TensorSource],
    source: ModelSource,
) -> dict[str, QuantChoice]:
    """The tensors stored quantized, with their format and why (see builder/quant_plan.py)."""
    if isq == "none":
        return {}
    if isq is not None:
        return {name: c for name, c in plan_quantization(spec, expected, isq).items() if c.format is not None}
    chosen: dict[str, QuantChoice] = {}
    for name, shape in expected.items():
        ref = plan[name]
        if ref.rows is not None or ref.stack is not None or not runs_quantized(name, shape):
            continue
        carried = source.block_format(ref.name)
        if carried is not None:
            chosen[name] = QuantChoice(name, carried, "carried over from the source")
    return chosen


def _default_name(source_name: str) -> str:
    name = Path(source_name).name if Path(source_name).exists() else source_name
    return name.removesuffix(".gguf")


def _input_file_info(path: Path) -> FileInfo:
    return FileInfo(path=path.name, size=path.stat().st_size, sha256=sha256_file(path))
