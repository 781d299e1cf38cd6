"""`llmc build`: plan (source → normalised spec → what each tensor becomes) → write the weights →
the target's device code (builder/targets/) → tokenizer and manifest, committed as one directory."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import llmc
from llmc.artifacts import generation
from llmc.artifacts.files import sha256_file
from llmc.artifacts.inspect import describe_mix, parameter_count, weight_mix
from llmc.artifacts.manifest import (
    FORMAT_VERSION,
    BuildInfo,
    FileInfo,
    Manifest,
    ModelSpec,
    SourceInfo,
    SourceQuantization,
    TargetCode,
    TokenizerInfo,
)
from llmc.artifacts.staging import check_output
from llmc.artifacts.writer import CHAT_TEMPLATE_FILE, TOKENIZER_FILE, ArtifactWriter
from llmc.builder import DEFAULT_CPU_ISA
from llmc.builder.arch import TensorSource, spec_from_config, tensor_plan
from llmc.builder.quant_plan import QuantChoice, plan_quantization, runs_quantized
from llmc.builder.quant_report import REPORT_FILE, QuantReport
from llmc.builder.sources import ModelSource, open_source
from llmc.builder.sources.prequantized import LAYOUT_BLOCKS, LAYOUT_DEQUANTIZED
from llmc.builder.targets import TARGET_NAMES
from llmc.builder.targets.base import CompileOptions, Progress, Target
from llmc.builder.targets.cpu import CpuTarget
from llmc.errors import BadInputError, BadModelError
from llmc.logs import get_logger
from llmc.model.decoder import CausalLM
from llmc.quant import native as native_quant
from llmc.quant.formats import FORMATS

log = get_logger("llmc.builder")

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# The float tables a float32 build keeps in the source's own 16-bit dtype where it has one, when
# they stay unquantized (the embedding and lm_head of GPTQ / AWQ checkpoints, or of `--isq none`):
# widening them is exact, and the logits then read half the bytes per token (model/half_linear.py,
# kernels/cpu/half_matmul_driver.h). Other float tensors are small, or all the model's linears.
SOURCE_PRECISION_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
SOURCE_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


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
    # `--cpu-isa`: the CPU capabilities the decode step is compiled for (builder/targets/cpu.py).
    cpu_isa: str = DEFAULT_CPU_ISA
    # Time the weight forms for this host into the user's cache (kernels/cpu/autotune.py), so that
    # `llmc run` here starts without that pause (`--no-autotune`: skip).
    autotune: bool = True
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
    # Seconds per stage of the build (see build()): where the time went.
    stages: dict[str, float] | None = None

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
            "targets": list(m.targets),
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
                    "target": target,
                    "weights": c.weights,
                    "buckets": c.buckets,
                    "max_seq_len": c.max_seq_len,
                }
                for target, code in m.targets.items()
                for c in code.compiled
            ],
            "compile_seconds": None if self.compile_seconds is None else round(self.compile_seconds, 3),
            "compile_skipped": self.compile_skipped,
            "stages": self.stages,
        }


def _resolve_dtype(option: str, target: Target) -> str:
    if option != "auto":
        if option not in DTYPES:
            raise BadInputError(f"--dtype {option!r} is not one of auto, {', '.join(DTYPES)}")
        return option
    return target.default_dtype


def _targets(options: BuildOptions) -> list[Target]:
    """The device targets the build adds code for (builder/targets/), from `--target cpu,onnx`."""
    names = list(dict.fromkeys(n.strip() for n in options.target.split(",")))
    unknown = [n for n in names if n not in TARGET_NAMES]
    if unknown or not names:
        raise BadInputError(f"--target {options.target!r} is not supported; choose from: {', '.join(TARGET_NAMES)}")
    targets: list[Target] = []
    for name in names:
        if name == "cpu":
            targets.append(CpuTarget(options.compile, options.cpu_kernels, options.cpu_isa, options.autotune))
        else:
            from llmc.builder.targets.onnx import OnnxTarget  # needs the `onnx` package

            targets.append(OnnxTarget())
    return targets


def _expected_shapes(source: ModelSource) -> dict[str, list[int]]:
    spec = spec_from_config(source.config)
    with torch.device("meta"):
        model = CausalLM(spec, max_positions=1)
    return {name: list(p.shape) for name, p in model.named_parameters(remove_duplicate=True)}


@dataclass(frozen=True)
class BuildPlan:
    """What the build writes, decided before anything is written: the source, its spec, the dtype,
    every tensor's expected shape and where it comes from, and the tensors stored quantized."""

    source: ModelSource
    spec: ModelSpec
    dtype_name: str
    expected: dict[str, list[int]]  # canonical tensor name -> shape the model needs
    tensors: dict[str, TensorSource]  # canonical tensor name -> the source tensor(s) it is made of
    choices: dict[str, QuantChoice]  # the tensors stored quantized, with their format and why
    # float tensors stored in the source's 16-bit dtype rather than the build's (SOURCE_PRECISION_TENSORS)
    source_precision: dict[str, torch.dtype]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def float_dtype(self, name: str) -> torch.dtype:
        """The dtype the artifact stores the unquantized tensor `name` in."""
        return self.source_precision.get(name, self.dtype)

    @property
    def formats(self) -> dict[str, str]:
        return {name: choice.format for name, choice in self.choices.items() if choice.format is not None}


def plan_build(options: BuildOptions, targets: list[Target]) -> BuildPlan:
    """Open the source and check it against its config; refuse bad flags before the slow part."""
    dtype_name = _resolve_dtype(options.dtype, targets[0])
    source = open_source(options.model, options.gguf_file, options.weights)
    spec = spec_from_config(source.config)
    for target in targets:
        target.check(spec)
    expected = _expected_shapes(source)
    available = source.tensors()
    tensors = tensor_plan(spec, sorted(available))
    if spec.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BadModelError(
            f"model tensors do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        ref = tensors[name]
        got = list(available[ref.name].shape)
        if ref.rows is not None:
            got[0] = ref.rows[1] - ref.rows[0]
        if ref.stack is not None:
            got = [len(ref.stack), sum(available[n].shape[0] for n in ref.stack[0]), *got[1:]]
        if got != shape:
            raise BadModelError(f"tensor {name} has shape {got}, its config implies {shape}")
    choices = _choose_formats(options.isq, spec, expected, tensors, source)
    quantized = {name for name, choice in choices.items() if choice.format is not None}
    source_precision = {
        name: available[tensors[name].name].dtype
        for name in SOURCE_PRECISION_TENSORS
        if DTYPES[dtype_name] == torch.float32
        and name in tensors
        and name not in quantized
        and tensors[name].stack is None
        and available[tensors[name].name].dtype in SOURCE_PRECISION_DTYPES
    }
    return BuildPlan(source, spec, dtype_name, expected, tensors, choices, source_precision)


def _load_float(plan: BuildPlan, name: str) -> torch.Tensor:
    """A tensor as the source holds it, in float: rows cut out of a fused tensor or stacked experts."""
    ref, source = plan.tensors[name], plan.source
    if ref.stack is not None:
        return torch.stack([torch.cat([source.load(n) for n in group]) for group in ref.stack])
    tensor = source.load(ref.name)
    if ref.rows is not None:
        tensor = tensor[ref.rows[0] : ref.rows[1]]
    return tensor


def _carried(plan: BuildPlan, name: str, fmt: str | None) -> bool:
    """Whether `name` is stored as the source's own (or repacked) blocks of format `fmt`."""
    ref = plan.tensors[name]
    return fmt is not None and ref.rows is None and ref.stack is None and plan.source.block_format(ref.name) == fmt


def input_permutations(plan: BuildPlan) -> dict[str, torch.Tensor]:
    """`<layer>.input_perm` → the int32 input order of each carried weight stored permuted (act-order)."""
    perms: dict[str, torch.Tensor] = {}
    for name, fmt in plan.formats.items():
        if _carried(plan, name, fmt) and (perm := plan.source.input_permutation(plan.tensors[name].name)) is not None:
            perms[name.removesuffix("weight") + "input_perm"] = perm
    return perms


def _load_stored(plan: BuildPlan, name: str, formats: dict[str, str], report: QuantReport | None) -> torch.Tensor:
    """A tensor as the artifact stores it: in the build's dtype, or as GGML blocks (the source's
    own where they are already in the chosen format), recorded in the quantization report."""
    fmt = formats.get(name)
    if fmt is None:
        return _load_float(plan, name).to(plan.float_dtype(name))
    assert report is not None
    ref = plan.tensors[name]
    if _carried(plan, name, fmt):
        carried = plan.source.blocks(ref.name)
        report.add(name, plan.choices[name], plan.expected[name], carried, None)
        repacked = plan.source.repack_error(ref.name)
        if repacked is not None and plan.source.quantization is not None:
            report.add_repacked(name, plan.source.quantization["source_format"], *repacked)
        return carried
    weight = _load_float(plan, name).float()
    blocks = native_quant.quantize(fmt, weight)  # the torch codecs' bytes, natively (or them, without a compiler)
    report.add(name, plan.choices[name], plan.expected[name], blocks, weight)
    return blocks


def write_weights(
    writer: ArtifactWriter, plan: BuildPlan, isq: str | None, on_progress: Progress | None
) -> QuantReport | None:
    """Stage every tensor (and the quantization report, when anything is quantized)."""
    formats = plan.formats
    report = QuantReport(plan.dtype_name) if formats else None
    done = done_bytes = 0
    total = len(plan.expected)
    # Bytes of each tensor in the build's dtype: tensors differ in size by orders of magnitude, so
    # the rate (MB/s) and the ETA are measured in bytes rather than in tensors.
    sizes = {name: math.prod(shape) * plan.dtype.itemsize for name, shape in plan.expected.items()}
    total_bytes = sum(sizes.values())
    label = "writing weights" if isq in (None, "none") else "quantizing weights"

    def tick(name: str) -> None:
        nonlocal done, done_bytes
        done += 1
        done_bytes += sizes.get(name, 0)
        if on_progress is not None:
            on_progress(label, done, total, done_bytes, total_bytes)

    stored = {
        name: (torch.uint8, [shape[0], FORMATS[formats[name]].row_bytes(shape[1])])
        if name in formats
        else (plan.float_dtype(name), shape)
        for name, shape in plan.expected.items()
    }
    perms = input_permutations(plan)
    stored |= {name: (torch.int32, list(perm.shape)) for name, perm in perms.items()}

    def load(name: str) -> torch.Tensor:
        return perms[name] if name in perms else _load_stored(plan, name, formats, report)

    writer.write_weights(stored, load, on_tensor=tick, quant=formats)
    if report is not None:
        writer.write_bytes(REPORT_FILE, report.encode())
    return report


def build(options: BuildOptions, on_progress: Progress | None = None) -> BuildResult:
    """Plan -> write the weights -> the target's device code -> tokenizer and manifest, committed
    at once (a failed build leaves nothing behind)."""
    started = time.perf_counter()
    stages: dict[str, float] = {}
    clock = [started]

    def stage_done(name: str) -> None:
        """Record and log the time since the previous stage ended (`build.stage` events)."""
        now = time.perf_counter()
        stages[name] = round(now - clock[0], 3)
        clock[0] = now
        log.info("build.stage", stage=name, seconds=stages[name])

    targets = _targets(options)
    check_output(options.output.resolve())  # refuse someone else's folder before the slow part
    generation_flag = generation.load_arg(options.generation_config) if options.generation_config else {}
    plan = plan_build(options, targets)
    source = plan.source
    log.info(
        "build.source", kind=source.kind, name=source.name, architecture=plan.spec.architecture, dtype=plan.dtype_name
    )
    writer = ArtifactWriter(options.output)
    stage_done("plan")  # opening the source, reading its configuration and tokenizer
    try:
        for target in targets:
            target.start(writer)  # e.g. the CPU kernel library compiles while the weights are written
        report = write_weights(writer, plan, options.isq, on_progress)
        stage_done("weights")  # read, quantize and write every tensor
        outputs = {t.name: t.finish(writer, plan.spec, plan.formats, plan.dtype, on_progress) for t in targets}
        stage_done("device_code")  # the targets' kernels, compiled steps and graphs
        _write_tokenizer(writer, source)
        codes = {name: out.code for name, out in outputs.items()}
        manifest = _manifest(options, plan, writer, codes, report, generation_flag)
        writer.commit(manifest)
        stage_done("finish")  # tokenizer, manifest, checksums and commit
    except BaseException:
        for target in targets:
            target.abort()
        writer.abort()
        raise
    for target in targets:
        target.close()
    # The compile summary is the first target's that compiles (the CPU's).
    code = next(
        (out for out in outputs.values() if out.compile_seconds or out.compile_skipped), outputs[targets[0].name]
    )
    seconds = time.perf_counter() - started
    log.info("build.done", output=str(options.output), seconds=round(seconds, 3))
    return BuildResult(options.output, manifest, seconds, report, code.compile_skipped, code.compile_seconds, stages)


def _write_tokenizer(writer: ArtifactWriter, source: ModelSource) -> None:
    tok = source.tokenizer
    writer.write_bytes(TOKENIZER_FILE, tok.tokenizer_json)
    if tok.chat_template is not None:
        writer.write_bytes(CHAT_TEMPLATE_FILE, tok.chat_template.encode("utf-8"))


def _manifest(
    options: BuildOptions,
    plan: BuildPlan,
    writer: ArtifactWriter,
    targets: dict[str, TargetCode],
    report: QuantReport | None,
    generation_flag: dict[str, Any],
) -> Manifest:
    source, tok = plan.source, plan.source.tokenizer
    defaults = generation.override(
        generation.from_source(
            source.generation_config, generation.GGUF_SAMPLING_ORIGIN if source.kind == "gguf" else None
        ),
        generation_flag,
        "--generation-config",
    )
    return Manifest(
        format_version=FORMAT_VERSION,
        model_name=options.name or _default_name(source.name),
        target=next(iter(targets)),
        dtype=plan.dtype_name,
        model=plan.spec,
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
                quantization=_source_quantization(source, plan),
            ),
            flags={
                "dtype": plan.dtype_name,
                "target": options.target,
                "isq": options.isq,
                "compile": None if options.compile is None else _compile_flags(options.compile),
                "cpu_kernels": options.cpu_kernels,
                "cpu_isa": options.cpu_isa,
            },
            torch_version=torch.__version__.split("+")[0],
            report_file=REPORT_FILE if report is not None else None,
        ),
        targets=targets,
    )


def _source_quantization(source: ModelSource, plan: BuildPlan) -> SourceQuantization | None:
    q = source.quantization
    if q is None:
        return None
    layout = LAYOUT_BLOCKS if plan.formats else LAYOUT_DEQUANTIZED
    return SourceQuantization(q["source_format"], q["bits"], q["group_size"], q["act_order"], layout)


def _compile_flags(options: CompileOptions) -> dict[str, object]:
    return {"buckets": list(options.buckets), "max_seq_len": options.max_seq_len, "block_size": options.block_size}


def _choose_formats(
    isq: str | None,
    spec: ModelSpec,
    expected: dict[str, list[int]],
    plan: dict[str, TensorSource],
    source: ModelSource,
) -> dict[str, QuantChoice]:
    """The tensors stored quantized, with their format and why (see builder/quant_plan.py)."""
    if source.quantization is not None and isq not in (None, "none"):
        raise BadInputError(
            f"--isq {isq}: the source is already quantized ({source.quantization['source_format']}); "
            "requantizing it would lose quality. Build without --isq to keep its weights exactly, "
            "or pass --isq none to store them dequantized"
        )
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
