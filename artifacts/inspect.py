"""A human- and machine-readable summary of a manifest (`llmc inspect`)."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import msgspec

from llmc.artifacts.generation import effective
from llmc.artifacts.manifest import CompiledStep, KernelLibrary, Manifest, TargetCode, TensorInfo, capability_rank
from llmc.errors import LlmcError
from llmc.quant.formats import stored_format


def tensor_parameters(tensor: TensorInfo) -> int:
    """The weights a tensor holds as the model has them: a quantized tensor's logical shape
    (rows x columns), not its stored [rows, row_bytes] of blocks."""
    if tensor.quant is not None:
        return tensor.shape[0] * stored_format(tensor.quant).cols(tensor.shape[1])
    return math.prod(tensor.shape)


def parameter_count(manifest: Manifest) -> int:
    """The model's parameter count: `llmc build`'s summary and `llmc inspect` both print this one."""
    return sum(tensor_parameters(t) for t in manifest.tensors)


def weight_mix(manifest: Manifest) -> dict[str, dict[str, int]]:
    """Per storage format (q4_1, q8_0, ... or the float dtype of unquantized tensors): how many
    tensors and parameters use it, most parameters first."""
    mix: dict[str, dict[str, int]] = {}
    for tensor in manifest.tensors:
        entry = mix.setdefault(tensor.quant or tensor.dtype.lower(), {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += tensor_parameters(tensor)
    return dict(sorted(mix.items(), key=lambda item: (-item[1]["parameters"], item[0])))


def describe_mix(mix: dict[str, dict[str, int]]) -> str:
    """One line for people: `q4_1 (210 tensors, 72% of parameters), q8_0 (1 tensor, 21%), ...`."""
    total = sum(entry["parameters"] for entry in mix.values()) or 1
    parts = []
    for i, (name, entry) in enumerate(mix.items()):
        share = f"{100 * entry['parameters'] / total:.0f}%" + (" of parameters" if i == 0 else "")
        plural = "" if entry["tensors"] == 1 else "s"
        parts.append(f"{name} ({entry['tensors']} tensor{plural}, {share})")
    return ", ".join(parts)


def summarize(manifest: Manifest) -> dict[str, Any]:
    formats: dict[str, int] = {}
    for tensor in manifest.tensors:
        if tensor.quant is not None:
            formats[tensor.quant] = formats.get(tensor.quant, 0) + 1
    mix = weight_mix(manifest)
    return {
        "model_name": manifest.model_name,
        "format_version": manifest.format_version,
        "target": manifest.target,
        "dtype": manifest.dtype,
        # dtype is that of activations and unquantized tensors; weights is what the tensors are stored as.
        "weights": describe_mix(mix),
        "weight_formats": mix,
        "parameters": parameter_count(manifest),
        "tensors": len(manifest.tensors),
        "quantized_tensors": dict(sorted(formats.items())),
        "bytes": sum(f.size for f in manifest.files),
        "model": msgspec.to_builtins(manifest.model),
        "tokenizer": msgspec.to_builtins(manifest.tokenizer),
        "generation": msgspec.to_builtins(effective(manifest.generation)),  # what requests that set none get
        "build": {
            "llmc_version": manifest.build.llmc_version,
            "torch_version": manifest.build.torch_version,
            "source": manifest.build.source.name,
            "source_kind": manifest.build.source.kind,
            "flags": manifest.build.flags,
        },
        "files": {f.path: f.size for f in manifest.files},
        "targets": {name: target_status(name, code) for name, code in manifest.targets.items()},
    }


def _kernels_status(libraries: list[KernelLibrary], torch_version: str) -> tuple[list[dict[str, Any]], str | None]:
    """Each kernel library (one per ISA) with whether it runs here and whether the runtime would
    load it (`selected`); and why none would be loaded (None where one would)."""
    from llmc.kernels.cpu import cpu_kernels  # imports torch: only for the cpu target, with torch there

    entries = []
    for library in libraries:
        why: str | None = cpu_kernels.unsupported(library.isa)
        if library.torch_version != torch_version:
            why = f"compiled for torch {library.torch_version}, this is torch {torch_version}"
        entries.append({**msgspec.to_builtins(library), "runs_here": why is None, "why_not": why})
    try:
        isa, why_none = cpu_kernels.choose([e["isa"] for e in entries if e["runs_here"]])
    except LlmcError as exc:  # $LLMC_CPU_ISA names one this CPU lacks: the runtime would refuse it
        isa, why_none = None, exc.message
    for entry in entries:
        entry["selected"] = entry["isa"] == isa
    return entries, None if isa is not None else why_none


def _step_why_not(step: CompiledStep, host: str, torch_version: str, kernels_why_not: str | None) -> str | None:
    if step.torch_version != torch_version:
        return f"compiled with torch {step.torch_version}, this is torch {torch_version}"
    if capability_rank(step.cpu_capability, host) is None:
        return f"compiled for a {step.cpu_capability} CPU, this one is {host}"
    if step.cpu_kernels and kernels_why_not is not None:
        return f"it calls the kernel library, which cannot run here: {kernels_why_not}"
    return None


def target_status(name: str, code: TargetCode) -> dict[str, Any]:
    """One target's device code and whether this host can run each part (`why_not`: None where it
    can). Where a part cannot run, the runtime runs the model eagerly on torch's kernels instead."""
    if name == "onnx" and code.graph is not None:
        return _onnx_status(code)
    if name != "cpu":
        why = f"this llmc runs on the cpu only, not {name}"
        return {"capability": code.capability, "runs_here": False, "why_not": why}
    try:
        import torch
    except ImportError:
        return {"capability": code.capability, "runs_here": False, "why_not": "torch is not installed: llmc[torch]"}
    host = torch.backends.cpu.get_cpu_capability()
    version = torch.__version__.split("+")[0]
    kernels, kernels_why_not = _kernels_status(code.kernels, version)
    compiled = []
    for step in code.compiled:
        why_not = _step_why_not(step, host, version, kernels_why_not)
        entry = {
            "kind": step.kind,
            "weights": step.weights,
            "buckets": step.buckets,
            "max_seq_len": step.max_seq_len,
            "programs": [program.layers for program in step.programs],
            "runs": len(step.order),
            "logits_program": step.logits is not None,
        }
        compiled.append({**entry, "runs_here": why_not is None, "why_not": why_not})
    return {"capability": code.capability, "this_host": host, "kernels": kernels, "compiled": compiled}


def _onnx_status(code: TargetCode) -> dict[str, Any]:
    """The onnx target runs wherever onnxruntime is installed (on any CPU: its kernels pick the ISA)."""
    assert code.graph is not None
    entry = {"capability": code.capability, "graph": code.graph.model, "accuracy_level": code.graph.accuracy_level}
    if importlib.util.find_spec("onnxruntime") is None:
        return {**entry, "runs_here": False, "why_not": "onnxruntime is not installed: pip install 'llmc[lean]'"}
    return {**entry, "runs_here": True, "why_not": None}


def report_table(report: dict[str, Any]) -> list[str]:
    """Human-readable lines of a build report (build_report.json): one per quantized tensor, then totals."""
    lines = [f"{'tensor':<44} {'format':<6} {'bytes before':>13} {'after':>12} {'rel RMSE':>9}"]
    for t in report["tensors"]:
        rmse = "carried" if t["rel_rmse"] is None else f"{t['rel_rmse']:.4f}"
        lines.append(f"{t['name']:<44} {t['format']:<6} {t['bytes_before']:>13,} {t['bytes_after']:>12,} {rmse:>9}")
    total = report["summary"]
    lines.append(
        f"{total['tensors_quantized']} tensors quantized {total['formats']}: "
        f"{total['bytes_before']:,} → {total['bytes_after']:,} bytes"
    )
    return lines
