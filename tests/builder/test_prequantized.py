"""GPTQ / AWQ / compressed-tensors checkpoints (issue 21): written here by reference packers that follow
the published layouts bit by bit, built by llmc, and compared with their dequantization: the repacked
blocks exactly, the logits of the built artifact against transformers carrying the same weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, build
from llmc.errors import BadInputError, BadModelError
from llmc.kernels.cpu.qmatmul_cpu import CpuQMatmul
from llmc.model.quant_linear import FusedQuantLinear
from llmc.quant.formats import FORMATS
from tests.conftest import make_tiny_llama
from tests.helpers import open_engine, prompt_logits

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PROJECTIONS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
# Scales k * 2^-12 with k < 64: times any zero <= 15 (or q - z within +-256) still fits an f16's
# 11 significant bits, so q4_1's m = -z * s is exact and the repack must match bit for bit.
EXACT_SCALE_STEPS, EXACT_SCALE_UNIT = 64, 2.0**-12
LOGITS_TOL = 1e-4  # issue 21: fp32 logits vs a float model carrying the dequantized weights


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 128 / 256 wide so group 128 fits every projection.
    return make_tiny_llama(tmp_path_factory.mktemp("pq") / "llama", seed=3, hidden_size=128, intermediate_size=256)


@dataclass
class Quantized:
    """One layer's integers and parameters: w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g], g = g_idx[k]."""

    q: torch.Tensor  # int64 [N, K]
    scale: torch.Tensor  # f16 [N, G]
    zero: torch.Tensor  # int64 [N, G]
    g_idx: torch.Tensor  # int64 [K]

    def dequantize(self) -> torch.Tensor:
        return (self.q - self.zero[:, self.g_idx]).float() * self.scale.float()[:, self.g_idx]


def make_quantized(
    n: int,
    k: int,
    bits: int,
    group: int,
    sym: bool,
    act_order: bool,
    gen: torch.Generator,
    exact: bool = True,
    g_idx: torch.Tensor | None = None,
) -> Quantized:
    groups = 1 if group == -1 else -(-k // group)  # the last group may be short
    size = k if group == -1 else group
    if g_idx is not None:
        pass
    elif act_order:  # GPTQ's desc_act: column perm[i] is quantized i-th, so it lands in group i // size
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // size
    else:
        g_idx = torch.arange(k) // size
    top = (1 << bits) - 1
    q = torch.randint(0, top + 1, (n, k), generator=gen)
    if exact:
        scale = (torch.randint(1, EXACT_SCALE_STEPS, (n, groups), generator=gen) * EXACT_SCALE_UNIT).half()
    else:
        scale = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).half()
    zero = torch.full((n, groups), 1 << (bits - 1)) if sym else torch.randint(1, top + 1, (n, groups), generator=gen)
    return Quantized(q, scale, zero, g_idx)


def _pack_along_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight packing: [R, C] -> [R * bits / 32, C], value j of each run in bits j*bits."""
    per = 32 // bits
    out = np.zeros((values.shape[0] // per, values.shape[1]), dtype=np.uint32)
    for row in range(out.shape[0]):
        for j in range(per):
            out[row] |= values[row * per + j].astype(np.uint32) << np.uint32(bits * j)
    return out.view(np.int32)


def _pack_along_cols(values: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    """AutoGPTQ's qzeros (order None) and AutoAWQ's qweight/qzeros (order [0,2,4,6,1,3,5,7])."""
    per = 32 // bits
    order = order or list(range(per))
    mask = np.uint32((1 << bits) - 1)
    out = np.zeros((values.shape[0], values.shape[1] // per), dtype=np.uint32)
    for col in range(out.shape[1]):
        for i in range(per):
            out[:, col] |= (values[:, col * per + order[i]].astype(np.uint32) & mask) << np.uint32(bits * i)
    return out.view(np.int32)


def pack_gptq(qz: Quantized, bits: int, v1: bool) -> dict[str, torch.Tensor]:
    zeros = qz.zero.t().numpy() - (1 if v1 else 0)  # v1 checkpoints store zero - 1
    return {
        "qweight": torch.from_numpy(_pack_along_rows(qz.q.t().contiguous().numpy(), bits)),
        "qzeros": torch.from_numpy(_pack_along_cols(zeros, bits)),
        "scales": qz.scale.t().contiguous(),
        "g_idx": qz.g_idx.to(torch.int32),
    }


def pack_awq(qz: Quantized) -> dict[str, torch.Tensor]:
    return {
        "qweight": torch.from_numpy(_pack_along_cols(qz.q.t().contiguous().numpy(), 4, AWQ_ORDER)),
        "qzeros": torch.from_numpy(_pack_along_cols(qz.zero.t().contiguous().numpy(), 4, AWQ_ORDER)),
        "scales": qz.scale.t().contiguous(),
    }


def pack_compressed_tensors(qz: Quantized, sym: bool, act_order: bool) -> dict[str, torch.Tensor]:
    """With the compressed-tensors package's own packer where it is installed, else the same layout
    by hand: signed q - 8 stored as q, 8 per int32 along K; the signed zero point packed along N."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:

        def pack_to_int32(value: torch.Tensor, num_bits: int, packed_dim: int = 1) -> torch.Tensor:
            shifted = (value.to(torch.int64) + 8).numpy()
            if packed_dim == 0:
                return torch.from_numpy(_pack_along_rows(shifted, num_bits))
            return torch.from_numpy(_pack_along_cols(shifted, num_bits))

    n, k = qz.q.shape
    out = {
        "weight_packed": pack_to_int32((qz.q - 8).to(torch.int8), 4),
        "weight_scale": qz.scale.contiguous(),
        "weight_shape": torch.tensor([n, k]),
    }
    if not sym:
        out["weight_zero_point"] = pack_to_int32((qz.zero - 8).to(torch.int8), 4, packed_dim=0)
    if act_order:
        out["weight_g_idx"] = qz.g_idx.to(torch.int32)
    return out


@dataclass(frozen=True)
class Variant:
    method: str  # gptq-v1 | gptq-v2 | awq | ct
    bits: int
    group: int
    sym: bool
    act_order: bool
    # Layers reading the same input (q/k/v, gate/up) share one g_idx, as GPTQ gives them (one
    # Hessian): the runtime fuses them behind one gather. False: each its own order, run apart.
    shared_order: bool = True

    @property
    def id(self) -> str:
        sym = "sym" if self.sym else "asym"
        order = ("-actorder" if self.shared_order else "-actorder-unshared") if self.act_order else ""
        return f"{self.method}-{self.bits}b-g{self.group}-{sym}{order}"

    def config(self) -> dict[str, Any]:
        if self.method.startswith("gptq"):
            return {
                "quant_method": "gptq",
                "bits": self.bits,
                "group_size": self.group,
                "desc_act": self.act_order,
                "sym": self.sym,
                "checkpoint_format": "gptq" if self.method == "gptq-v1" else "gptq_v2",
            }
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group, "zero_point": True, "version": "gemm"}
        weights = {
            "num_bits": 4,
            "type": "int",
            "symmetric": self.sym,
            "strategy": "channel" if self.group == -1 else "group",
            "group_size": None if self.group == -1 else self.group,
            "actorder": "group" if self.act_order else None,
            "dynamic": False,
        }
        group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None}
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {**group, "format": "pack-quantized"}},
            "ignore": ["lm_head"],
        }

    def pack(self, qz: Quantized) -> dict[str, torch.Tensor]:
        if self.method.startswith("gptq"):
            return pack_gptq(qz, self.bits, self.method == "gptq-v1")
        if self.method == "awq":
            return pack_awq(qz)
        return pack_compressed_tensors(qz, self.sym, self.act_order)


VARIANTS = [
    Variant("gptq-v1", 4, 32, False, True),
    Variant("gptq-v1", 4, 64, False, True, shared_order=False),
    Variant("gptq-v1", 4, 128, True, False),
    Variant("gptq-v2", 4, 64, False, False),
    Variant("gptq-v2", 4, 32, True, True),
    Variant("gptq-v2", 4, -1, False, False),
    Variant("gptq-v2", 4, 96, False, True),  # 128 = 96 + 32 and 256 = 2 * 96 + 64: short last groups
    Variant("gptq-v1", 8, 128, True, False),
    Variant("awq", 4, 32, False, False),
    Variant("awq", 4, 128, False, False),
    Variant("ct", 4, 32, True, True),
    Variant("ct", 4, 64, False, False),
    Variant("ct", 4, -1, True, False),
    Variant("ct", 4, 96, True, False),
]


def write_checkpoint(
    float_dir: Path,
    out: Path,
    variant: Variant,
    seed: int = 0,
    exact: bool = True,
    tables: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The float model's folder with its projections replaced by `variant`'s packed tensors; returns
    the dequantized reference weight of every projection. `tables`: store the embedding and lm_head
    in this dtype, as GPTQ checkpoints keep them in float16 (their widened values join the reference)."""
    shutil.copytree(float_dir, out)
    (out / "model.safetensors").unlink()
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = variant.config()
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(float_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    reference: dict[str, torch.Tensor] = {}
    packed: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        layer = name.removesuffix(".weight")
        if not layer.endswith(PROJECTIONS):
            packed[name] = tensors[name]
            if tables is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
                packed[name] = tensors[name].to(tables)
                reference[name] = packed[name].float()
            continue
        n, k = tensors[name].shape
        shared = layer.rsplit("_proj", 1)[0].replace("self_attn.k", "self_attn.q").replace("self_attn.v", "self_attn.q")
        shared = shared.replace("mlp.up", "mlp.gate") if variant.shared_order else layer
        qz = make_quantized(
            n, k, variant.bits, variant.group, variant.sym, variant.act_order, gen, exact, orders.get(shared)
        )
        orders[shared] = qz.g_idx
        reference[name] = qz.dequantize()
        packed |= {f"{layer}.{suffix}": t for suffix, t in variant.pack(qz).items()}
    save_file(packed, out / "model.safetensors")
    return reference


def _build(folder: Path, out: Path, isq: str | None = None) -> Path:
    build(
        BuildOptions(
            model=str(folder), gguf_file=None, weights=None, output=out, dtype="f32", isq=isq, cpu_kernels=False
        )
    )
    return out


def stored_weights(artifact_dir: Path) -> dict[str, torch.Tensor]:
    """Every quantized weight of the artifact dequantized by llmc's reference codec, its input
    columns put back in their natural order where the artifact stores an input_perm."""
    artifact = Artifact.open(artifact_dir)
    weights = dict(artifact.weights())
    out = {}
    for info in artifact.manifest.tensors:
        if info.quant is None:
            continue
        w = FORMATS[info.quant].dequantize(weights[info.name])
        perm = weights.get(info.name.removesuffix("weight") + "input_perm")
        if perm is not None:
            natural = torch.empty_like(w)
            natural[:, perm.long()] = w
            w = natural
        out[info.name] = w
    return out


class ReferenceMatmul(nn.Module):
    """Dequantize in float32, then multiply: the exact path the 1e-4 logits check goes through
    (the CPU kernels quantize activations to int8 / bf16)."""

    form_for = staticmethod(CpuQMatmul.form_for)  # what the backend asks the layer class when planning

    def __init__(self, blocks: torch.Tensor, fmt: str, **_: object) -> None:
        super().__init__()
        self.weight = FORMATS[fmt].dequantize(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.weight.t()).to(x.dtype)


def hf_logits(float_dir: Path, reference: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    state = hf.state_dict()
    for name, w in reference.items():
        state[name].copy_(w)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_repack_is_exact_and_logits_match(
    variant: Variant, float_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = write_checkpoint(float_llama, tmp_path / "ckpt", variant)
    artifact_dir = _build(tmp_path / "ckpt", tmp_path / "artifact")
    manifest = Artifact.open(artifact_dir).manifest
    stored = stored_weights(artifact_dir)
    assert sorted(stored) == sorted(reference)
    for name, w in reference.items():
        assert torch.equal(stored[name], w), name  # bit for bit: the scales were chosen f16-exact
    expected = {8: "q8_0"}.get(variant.bits, "q4_0" if variant.sym else "q4_1")
    assert {t.quant for t in manifest.tensors if t.quant} == {expected}
    perms = [t.name for t in manifest.tensors if t.name.endswith("input_perm")]
    assert len(perms) == (len(reference) if variant.act_order else 0)
    quantization = manifest.build.source.quantization
    assert quantization is not None and quantization.layout == "ggml-legacy-blocks"
    assert quantization.act_order == variant.act_order and quantization.bits == variant.bits
    report = json.loads((artifact_dir / "build_report.json").read_text())
    for entry in report["tensors"]:
        assert entry["rel_rmse"] == 0.0 and entry["max_abs_err"] == 0.0 and entry["source_format"]

    from llmc.runtime.backends import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "CpuQMatmul", ReferenceMatmul)
    ids = torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = open_engine(artifact_dir)
    got = prompt_logits(engine, ids)
    want = hf_logits(float_llama, reference, ids)
    assert (got - want).abs().max().item() < LOGITS_TOL
    fused = [m for m in engine.runner.model.modules() if isinstance(m, FusedQuantLinear)]
    assert len(fused) == (2 * 2 if variant.shared_order else 0)  # qkv and gate_up in both layers


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernels", [False, True], ids=["widened", "cpu-kernel"])
def test_16_bit_tables_are_stored_as_the_checkpoint_has_them(
    dtype: torch.dtype, kernels: bool, float_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: Any
) -> None:
    """A float32 build keeps a checkpoint's float16 / bfloat16 embedding and lm_head in that dtype
    (exact; half the bytes per token); the lm_head runs through llmc's kernel over the 16-bit values
    where the library is loaded, else widened once at load; the logits match either way."""
    if kernels:
        request.getfixturevalue("cpu_kernels_loaded")  # skips where this CPU runs no library
    reference = write_checkpoint(float_llama, tmp_path / "ckpt", VARIANTS[2], tables=dtype)
    build(
        BuildOptions(
            model=str(tmp_path / "ckpt"),
            gguf_file=None,
            weights=None,
            output=tmp_path / "artifact",
            dtype="f32",
            cpu_kernels=kernels,
        )
    )
    manifest = Artifact.open(tmp_path / "artifact").manifest
    stored = {t.name: t.dtype for t in manifest.tensors}
    name = {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    assert stored["model.embed_tokens.weight"] == stored["lm_head.weight"] == name
    assert stored["model.norm.weight"] == "F32"

    from llmc.runtime.backends import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "CpuQMatmul", ReferenceMatmul)
    engine = open_engine(tmp_path / "artifact")
    head = type(engine.runner.model.lm_head).__name__
    assert head == ("CpuHalfMatmul" if kernels else "WidenedLinear")
    ids = torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    got = prompt_logits(engine, ids)
    want = hf_logits(float_llama, reference, ids)
    assert (got - want).abs().max().item() < LOGITS_TOL
    if not kernels:  # `llmc export --gguf` writes what llama.cpp reads: float16 stays F16 (its BF16 support varies)
        from llmc.builder.gguf_export import _gguf_tensors

        artifact = Artifact.open(tmp_path / "artifact")
        quant = {t.name: t.quant for t in artifact.manifest.tensors if t.quant}
        tensors = _gguf_tensors(manifest.model, "llama", artifact.lazy_weights(), quant)
        exported = {n: data.dtype for n, data, _ in tensors}
        expected = torch.float16 if dtype == torch.float16 else torch.float32
        assert exported["token_embd.weight"] == exported["output.weight"] == expected


# transformers + compressed-tensors 0.20 load symmetric pack-quantized checkpoints; asymmetric ones
# (packed zero points) fail its shape check and actorder "group" was removed from its schema, so
# those variants are checked against the packer above only.
CT_THIRD_PARTY = [Variant("ct", 4, 32, True, False), Variant("ct", 4, -1, True, False)]


@pytest.mark.parametrize("variant", CT_THIRD_PARTY, ids=lambda v: v.id)
def test_compressed_tensors_logits_match_transformers_reading_the_checkpoint(
    variant: Variant, float_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    write_checkpoint(float_llama, tmp_path / "ckpt", variant, seed=5)
    artifact_dir = _build(tmp_path / "ckpt", tmp_path / "artifact")
    from llmc.runtime.backends import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "CpuQMatmul", ReferenceMatmul)
    ids = torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    got = prompt_logits(open_engine(artifact_dir), ids)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max().item() < LOGITS_TOL


def test_inexact_scales_err_only_by_f16_rounding_of_m(float_llama: Path, tmp_path: Path) -> None:
    variant = Variant("gptq-v2", 4, 32, False, True)
    reference = write_checkpoint(float_llama, tmp_path / "ckpt", variant, exact=False)
    artifact_dir = _build(tmp_path / "ckpt", tmp_path / "artifact")
    stored = stored_weights(artifact_dir)
    for name, w in reference.items():
        # m = -z * s rounded once to f16: at most half an ulp of |m| <= 15 * max|s|, 2^-11 relative.
        bound = 15 * 0.021 * 2.0**-11
        assert (stored[name] - w).abs().max().item() <= bound, name
    report = json.loads((artifact_dir / "build_report.json").read_text())
    assert all(0 < t["max_abs_err"] <= bound for t in report["tensors"])
    assert all(t["source_format"] == "gptq-v2" for t in report["tensors"])


def test_isq_refused_unless_none(float_llama: Path, tmp_path: Path) -> None:
    variant = Variant("awq", 4, 32, False, False)
    reference = write_checkpoint(float_llama, tmp_path / "ckpt", variant)
    with pytest.raises(BadInputError, match=r"already quantized.*awq-gemm.*--isq none"):
        _build(tmp_path / "ckpt", tmp_path / "a", isq="q4_0")
    artifact_dir = _build(tmp_path / "ckpt", tmp_path / "b", isq="none")
    artifact = Artifact.open(artifact_dir)
    weights = dict(artifact.weights())
    assert not any(t.quant for t in artifact.manifest.tensors)
    for name, w in reference.items():
        assert torch.equal(weights[name], w), name
    quantization = artifact.manifest.build.source.quantization
    assert quantization is not None and quantization.layout == "dequantized"


def _tamper(folder: Path, change: Any) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def _reconfigure(folder: Path, **fields: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(fields)
    (folder / "config.json").write_text(json.dumps(config))


Q = "model.layers.0.self_attn.q_proj"
MALFORMED: list[tuple[str, Variant, Any, str]] = [
    ("bits3", Variant("gptq-v1", 4, 32, True, False), lambda f: _reconfigure(f, bits=3), "bits=3"),
    ("unknown-method", Variant("gptq-v1", 4, 32, True, False), lambda f: _reconfigure(f, quant_method="hqq"), "hqq"),
    ("marlin", Variant("gptq-v1", 4, 32, True, False), lambda f: _reconfigure(f, checkpoint_format="marlin"), "marlin"),
    ("awq-gemv", Variant("awq", 4, 32, False, False), lambda f: _reconfigure(f, version="gemv"), "version 'gemv'"),
    ("group-16", Variant("gptq-v1", 4, 32, True, False), lambda f: _reconfigure(f, group_size=16), "group_size=16"),
    (
        "missing-scales",
        Variant("gptq-v2", 4, 32, False, False),
        lambda f: _tamper(f, lambda t: t.pop(f"{Q}.scales")),
        rf"{Q}\.scales is missing",
    ),
    (
        "qzeros-shape",
        Variant("gptq-v2", 4, 32, False, False),
        lambda f: _tamper(f, lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"][:1]})),
        rf"{Q}\.qzeros has shape \[1, 16\], expected \[4, 16\]",
    ),
    (
        "g_idx-out-of-range",
        Variant("gptq-v2", 4, 32, False, True),
        lambda f: _tamper(f, lambda t: t[f"{Q}.g_idx"].fill_(9)),
        rf"{Q}\.g_idx has group indices outside",
    ),
    (
        "g_idx-uneven-groups",
        Variant("gptq-v2", 4, 32, False, True),
        lambda f: _tamper(f, lambda t: t[f"{Q}.g_idx"].copy_(torch.arange(128) // 32).__setitem__(0, 1)),
        rf"{Q}\.g_idx: a quantization group has a column count that is not a multiple of 32",
    ),
    (
        "ct-activations",
        Variant("ct", 4, 32, True, False),
        lambda f: _ct_group(f, input_activations={"num_bits": 8, "type": "int"}),
        "input_activations is set: activation quantization",
    ),
    (
        "ct-sparsity",
        Variant("ct", 4, 32, True, False),
        lambda f: _reconfigure(f, sparsity_config={"format": "sparse-24-bitmask"}),
        "2:4",
    ),
    (
        "ct-weight-shape",
        Variant("ct", 4, 32, True, False),
        lambda f: _tamper(f, lambda t: t.update({f"{Q}.weight_shape": torch.tensor([128, 64])})),
        rf"{Q}\.weight_shape is \[128, 64\]",
    ),
]


def _ct_group(folder: Path, **fields: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"].update(fields)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("case", "variant", "damage", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_checkpoints_are_refused_by_name(
    case: str, variant: Variant, damage: Any, message: str, float_llama: Path, tmp_path: Path
) -> None:
    write_checkpoint(float_llama, tmp_path / "ckpt", variant)
    damage(tmp_path / "ckpt")
    with pytest.raises(BadModelError, match=message):
        _build(tmp_path / "ckpt", tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()


def test_runtime_refuses_a_bad_input_perm(float_llama: Path, tmp_path: Path) -> None:
    """An artifact is untrusted: an input_perm must be a permutation and belong to a quantized layer."""
    from llmc.errors import BadArtifactError
    from llmc.model.decoder import build_model
    from llmc.model.quant_linear import check_permutation

    check_permutation(torch.tensor([2, 0, 1], dtype=torch.int32), 3)
    for bad in ([0, 0, 1], [0, 1, 3], [0, 1]):
        with pytest.raises(BadArtifactError, match="not a permutation"):
            check_permutation(torch.tensor(bad, dtype=torch.int32), 3)
    artifact_dir = _build(float_llama, tmp_path / "artifact", isq="q4_0")
    artifact = Artifact.open(artifact_dir)
    weights = dict(artifact.weights())
    quant = {t.name: t.quant for t in artifact.manifest.tensors if t.quant}
    with pytest.raises(BadArtifactError, match=r"model\.norm\.input_perm names no quantized linear layer"):
        build_model(artifact.manifest.model, {**weights, "model.norm.input_perm": torch.arange(128)}, 64, quant)


def test_act_order_artifact_is_not_exported_to_gguf(float_llama: Path, tmp_path: Path) -> None:
    from llmc.builder.gguf_export import export_gguf

    write_checkpoint(float_llama, tmp_path / "ckpt", Variant("gptq-v2", 4, 32, False, True))
    artifact_dir = _build(tmp_path / "ckpt", tmp_path / "artifact")
    with pytest.raises(BadInputError, match=r"act-order.*--isq none"):
        export_gguf(artifact_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.slow  # an ahead-of-time compile: ~15 s alone, more on a loaded machine
def test_act_order_compiled_step_matches_eager(float_llama: Path, tmp_path: Path) -> None:
    from llmc.builder.targets.base import CompileOptions
    from llmc.runtime.sampling_params import SamplingParams
    from tests.helpers import build_compiled, generate

    write_checkpoint(float_llama, tmp_path / "ckpt", Variant("gptq-v1", 4, 32, False, True))
    result = build_compiled(tmp_path / "ckpt", tmp_path / "artifact", "tiny", CompileOptions(buckets=(1, 2)))
    assert [c.kind for c in result.manifest.compiled_for("cpu")] == ["decode"]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    eager = open_engine(tmp_path / "artifact", compiled=False, kv_blocks=64)
    compiled = open_engine(tmp_path / "artifact", kv_blocks=64)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    for batch in (1, 2):
        before = compiled.runner.compiled_steps
        assert generate(compiled, prompts[:batch], greedy) == generate(eager, prompts[:batch], greedy)
        assert compiled.runner.compiled_steps - before >= greedy.max_tokens - 1


@pytest.mark.slow  # an ahead-of-time compile: ~15 s alone, more on a loaded machine
def test_16_bit_tables_compiled_step_matches_eager(float_llama: Path, tmp_path: Path, cpu_kernels_loaded: None) -> None:
    """The compiled step calls the half matmul on the float16 lm_head (the build traces it with
    the library loaded) and decodes what eager execution does."""
    from llmc.builder.targets.base import CompileOptions
    from llmc.runtime.sampling_params import SamplingParams
    from tests.helpers import build_compiled, generate

    write_checkpoint(float_llama, tmp_path / "ckpt", VARIANTS[2], tables=torch.float16)
    build_compiled(tmp_path / "ckpt", tmp_path / "artifact", "tiny", CompileOptions(buckets=(1, 2)))
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    # The built-in weight forms in both (as tests/runtime/test_compiled_step.py says why): a plan
    # measured here may give the eager engine dense copies that the packed package does not take.
    eager = open_engine(tmp_path / "artifact", compiled=False, kv_blocks=64, autotune=False)
    compiled = open_engine(tmp_path / "artifact", kv_blocks=64, autotune=False)
    assert type(compiled.runner.model.lm_head).__name__ == "CpuHalfMatmul"
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    for batch in (1, 2):
        before = compiled.runner.compiled_steps
        assert generate(compiled, prompts[:batch], greedy) == generate(eager, prompts[:batch], greedy)
        assert compiled.runner.compiled_steps - before >= greedy.max_tokens - 1
