"""The decoder as an ONNX graph for onnxruntime's CPU kernels.

One graph serves prefill chunks and decode batches (docs/artifact-format.md, "The ONNX target"):

  inputs   input_ids int64 [batch, seq]; seqlens_k int32 [batch] (each row's total length - 1);
           total_sequence_length int32 []; logits_rows int64 [rows] (rows of the flattened
           [batch * seq] positions whose logits are wanted); past_key_values.{i}.key / .value
           float32 [batch, kv_heads, max_len, head_dim]; longrope models (Phi-3) only:
           long_rope bool [batch] (the rows whose sequence rotates with the long factors)
  outputs  logits float32 [rows, vocab]; present.{i}.key / .value (same shape as the past)

Attention is `com.microsoft.GroupQueryAttention`, with rope inside it where the kernel can rotate
(kernel_rotates; else plain ops rotate q and k before it); the runtime binds each layer's present
to its past buffer, so the kernel writes the new keys in place (runtime/onnx_runner.py). Norms are
(Skip)SimplifiedLayerNormalization, or (Skip)LayerNormalization for LayerNorm models, the fused
forms onnxruntime's CPU provider has; routed experts are `com.microsoft.MoE`. A family's
differences are ModelSpec fields that each switch one small piece, as in model/decoder.py. GGML
weights are `MatMulNBits` (nbits.py); unquantized ones plain MatMul in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from llmc.artifacts.manifest import ModelSpec
from llmc.builder.onnx import nbits
from llmc.builder.onnx.external import ExternalData
from llmc.model.rope import inverse_frequencies, rope_kind

LONG_ROPE = "long_rope"  # the longrope graph's input: bool [batch], the rows that use the long factors
SLIDING = "sliding_attention"  # a layer type with a sliding window (model/decoder.py)
OPSET = 21  # the default domain: BitwiseAnd (18) and onnxruntime 1.20's full support
MS_DOMAIN = "com.microsoft"
# MatMulNBits' accuracy_level 4: activations quantized to int8 per block, as llama.cpp does (the
# fast kernels); 0 computes in float32, for tests that compare logits tightly.
DEFAULT_ACCURACY_LEVEL = 4
IR_VERSION = 10  # onnxruntime 1.20 reads up to IR 10

# A weight as the staged artifact holds it: float [N, K], or GGML blocks uint8 with their format.
Weight = tuple[torch.Tensor, str | None]
WeightSource = Callable[[str], Weight]


def unsupported(spec: ModelSpec) -> str | None:
    """Why this model's graph cannot be written yet, or None when it can (each reason says why)."""
    reasons = {
        "grouped or scaled expert routing (DeepSeek; onnxruntime's MoE takes a plain softmax top-k)": bool(
            spec.num_experts
        )
        and (spec.router != "softmax" or spec.routed_scaling_factor != 1.0),
        "experts with another activation than silu (onnxruntime's MoE runs them as SwiGLU)": bool(spec.num_experts)
        and spec.hidden_act != "silu",
        "multi-head latent attention (GroupQueryAttention needs values as wide as keys and rope on "
        "each head's leading channels; MLA's values are narrower and its rope channels trail)": spec.mla,
        f"the {spec.hidden_act} activation (the graph has {', '.join(_ACTIVATIONS)})": spec.hidden_act
        not in _ACTIVATIONS,
    }
    missing = [what for what, hit in reasons.items() if hit]
    return f"the ONNX target does not support {'; '.join(missing)} yet" if missing else None


@dataclass
class Mapping:
    """How each weight was written (the build report's per-tensor list)."""

    tensors: dict[str, str] = field(default_factory=dict)
    inexact_groups: int = 0


@dataclass
class _Graph:
    data: ExternalData
    accuracy_level: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _names: dict[str, int] = field(default_factory=dict)
    _consts: dict[tuple[str, bytes], str] = field(default_factory=dict)
    _nbits: dict[str, tuple[nbits.NBitsWeight, str]] = field(default_factory=dict)

    def fresh(self, base: str) -> str:
        count = self._names.get(base, 0)
        self._names[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs: Any) -> Any:
        """Add a node; returns its output name, or the list of them when several are asked for."""
        names = outputs if isinstance(outputs, list) else [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, names, name=self.fresh(f"n_{op_type}"), domain=domain, **attrs)
        )
        return names[0] if len(names) == 1 else names

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.tensor(name, array))
        return name

    def const(self, array: np.ndarray) -> str:
        """A small constant, shared by every node that needs the same value."""
        key = (str(array.dtype) + str(array.shape), array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.fresh("const"), array)
        return self._consts[key]

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def nbits_weight(self, name: str, weight: nbits.NBitsWeight) -> str:
        """Store one MatMulNBits weight once (a tied embedding and lm_head share it); its name."""
        if name not in self._nbits:
            self.init(f"{name}.qweight", weight.packed)
            self.init(f"{name}.scales", weight.scales.reshape(-1))
            if weight.offsets is not None:
                self.init(f"{name}.group_offsets", np.ascontiguousarray(weight.offsets.T))
            self._nbits[name] = (weight, name)
        return name


def _silu(g: _Graph, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def _gelu_tanh(g: _Graph, x: str) -> str:
    return g.op("Gelu", [x], approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[_Graph, str], str]] = {
    "silu": _silu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
}


class _Writer:
    """Walks the model's weights and emits the graph."""

    def __init__(self, spec: ModelSpec, weights: WeightSource, names: set[str], g: _Graph) -> None:
        self.spec = spec
        self.weights = weights
        self.names = names
        self.g = g
        self.mapping = Mapping()

    # ---- weights -----------------------------------------------------------------------
    def _nbits(self, name: str) -> nbits.NBitsWeight | None:
        tensor, fmt = self.weights(name)
        if fmt is None:
            return None
        mapped = nbits.map_blocks(tensor, fmt)
        kind = f"MatMulNBits {mapped.bits}-bit block {mapped.block}"
        self.mapping.tensors[name] = f"{fmt}: {kind}" + (" + group offsets" if mapped.offsets is not None else "")
        self.mapping.inexact_groups += mapped.inexact_groups
        return mapped

    def _dense(self, name: str) -> np.ndarray:
        tensor, fmt = self.weights(name)
        assert fmt is None, name
        self.mapping.tensors[name] = "float32"
        return tensor.float().numpy()

    def linear(self, x: str, names: list[str], packed: bool = False) -> list[str]:
        """x [rows, K] times the weights `names` (their `.weight`, `.bias`, `.input_perm`): one
        output per name, fused into one matmul where they share a quantized form; with `packed`,
        a fused product is returned whole ([y]) instead of split per name."""
        perms = [n for n in names if f"{n}.input_perm" in self.names]
        mapped = [self._nbits(f"{n}.weight") for n in names]
        fused = len(names) > 1 and not perms and all(m is not None for m in mapped)
        if fused:
            forms = {(m.bits, m.block, m.k) for m in mapped if m is not None}
            fused = len(forms) == 1
        if not fused:
            return [self._linear_one(x, n, m) for n, m in zip(names, mapped, strict=True)]
        weight = nbits.concat([m for m in mapped if m is not None])
        key = self.g.nbits_weight("+".join(names), weight)
        y = self._bias(self._matmul_nbits(x, key, weight), names)
        if packed:
            return [y]
        sizes = [m.n for m in mapped if m is not None]
        return list(self.g.op("Split", [y, self.g.ints(*sizes)], len(names), axis=-1))

    def _linear_one(self, x: str, name: str, mapped: nbits.NBitsWeight | None) -> str:
        if f"{name}.input_perm" in self.names:
            perm = self.weights(f"{name}.input_perm")[0].long().numpy()
            x = self.g.op("Gather", [x, self.g.init(f"{name}.input_perm", perm)], axis=-1)
        if mapped is not None:
            key = self.g.nbits_weight(name, mapped)
            y = self._matmul_nbits(x, key, mapped)
        else:
            w = self._dense(f"{name}.weight")
            y = self.g.op("MatMul", [x, self.g.init(f"{name}.weight_t", np.ascontiguousarray(w.T))])
        return self._bias(y, [name])

    def _bias(self, y: str, names: list[str]) -> str:
        biases = [f"{n}.bias" for n in names]
        if not any(b in self.names for b in biases):
            return y
        parts = [self._dense(b) if b in self.names else None for b in biases]
        sizes = [self._out_features(n) for n in names]
        bias = np.concatenate(
            [p if p is not None else np.zeros(s, np.float32) for p, s in zip(parts, sizes, strict=True)]
        )
        return self.g.op("Add", [y, self.g.init(f"{'+'.join(names)}.bias", bias.astype(np.float32))])

    def _out_features(self, name: str) -> int:
        return int(self.weights(f"{name}.weight")[0].shape[0])

    def _matmul_nbits(self, x: str, key: str, w: nbits.NBitsWeight) -> str:
        y = self.g.op(
            "MatMulNBits",
            [x, f"{key}.qweight", f"{key}.scales"],
            domain=MS_DOMAIN,
            K=w.k,
            N=w.n,
            bits=w.bits,
            block_size=w.block,
            accuracy_level=self.g.accuracy_level,
        )
        if w.offsets is None:
            return y
        # The affine formats' group term: y += groupsum(x) @ c^T (nbits.py). (A Gemm adding y
        # measured slower than MatMul + Add, at batch 16 by a sixth.)
        grouped = self.g.op("Reshape", [x, self.g.ints(0, w.k // w.block, w.block)])
        sums = self.g.op("ReduceSum", [grouped, self.g.ints(-1)], keepdims=0)
        return self.g.op("Add", [y, self.g.op("MatMul", [sums, f"{key}.group_offsets"])])

    def norm_weight(self, name: str) -> str:
        w = self._dense(name) + np.float32(self.spec.norm_weight_offset)
        return self.g.init(name, w.astype(np.float32))

    def _norm_params(self, prefix: str) -> list[str]:
        """The norm's scale, and its shift where the model's norms are LayerNorms (StableLM)."""
        params = [self.norm_weight(f"{prefix}.weight")]
        if self.spec.norm == "layer":
            params.append(self.g.init(f"{prefix}.bias", self._dense(f"{prefix}.bias")))
        return params

    def norm(self, x: str, prefix: str) -> str:
        """The norm `prefix` (its `.weight`, and `.bias` for LayerNorms) of x [rows, hidden]."""
        op = "LayerNormalization" if self.spec.norm == "layer" else "SimplifiedLayerNormalization"
        return str(self.g.op(op, [x, *self._norm_params(prefix)], axis=-1, epsilon=self.spec.rms_norm_eps))

    # ---- the model ---------------------------------------------------------------------
    def embed(self, ids: str) -> str:
        """The embeddings of the flattened ids: [batch * seq, hidden] (the graph's activations are
        2-D; only attention sees [batch, seq, ...])."""
        name = "model.embed_tokens.weight"
        mapped = self._nbits(name)
        flat = self.g.op("Reshape", [ids, self.g.ints(-1)])
        if mapped is None:
            table = self.g.init(name, self._dense(name))
            h = self.g.op("Gather", [table, flat], axis=0)
        else:
            h = self._gather_nbits(flat, self.g.nbits_weight("model.embed_tokens", mapped), mapped)
            h = self.g.op("Reshape", [h, self.g.ints(-1, self.spec.hidden_size)])
        if self.spec.embed_scale != 1.0:
            h = self.g.op("Mul", [h, self.g.const(np.array(self.spec.embed_scale, np.float32))])
        return str(h)

    def _gather_nbits(self, ids: str, key: str, w: nbits.NBitsWeight) -> str:
        """Rows of a MatMulNBits weight, dequantized: [rows, groups, block] float32."""
        g = self.g
        rows = g.op("Gather", [f"{key}.qweight", ids], axis=0)  # [rows, groups, bytes]
        if w.bits == 4:
            low = g.op("BitwiseAnd", [rows, g.const(np.array(0x0F, np.uint8))])
            high = g.op("BitShift", [rows, g.const(np.array(4, np.uint8))], direction="RIGHT")
            pairs = g.op(
                "Concat", [g.op("Unsqueeze", [low, g.ints(-1)]), g.op("Unsqueeze", [high, g.ints(-1)])], axis=-1
            )
            rows = g.op("Reshape", [pairs, g.ints(0, 0, w.block)])
        codes = g.op(
            "Sub", [g.op("Cast", [rows], to=TensorProto.FLOAT), g.const(np.array(1 << (w.bits - 1), np.float32))]
        )
        scales = g.op("Reshape", [f"{key}.scales", g.ints(w.n, w.k // w.block, 1)])
        out = g.op("Mul", [codes, g.op("Gather", [scales, ids], axis=0)])
        if w.offsets is not None:
            offsets = g.op("Reshape", [g.op("Transpose", [f"{key}.group_offsets"], perm=[1, 0]), g.ints(w.n, -1, 1)])
            out = g.op("Add", [out, g.op("Gather", [offsets, ids], axis=0)])
        return str(out)

    def attention(self, i: int, x: str, inputs: dict[str, str], outputs: list[str]) -> str:
        spec, g = self.spec, self.g
        p = f"model.layers.{i}.self_attn"
        projections = [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"]
        in_kernel = kernel_rotates(spec)
        qkv = self.linear(x, projections, packed=in_kernel and not spec.qk_norm)  # [q, k, v] or [q|k|v]
        if spec.qk_norm:
            qkv[0] = self._head_norm(qkv[0], f"{p}.q_norm.weight", spec.num_heads)
            qkv[1] = self._head_norm(qkv[1], f"{p}.k_norm.weight", spec.num_kv_heads)
        window = spec.sliding_window if spec.layer_types is None or spec.layer_types[i] == SLIDING else None
        rope = ".sliding" if window is not None and spec.rope_local_theta is not None else ""
        cos, sin = inputs[f"cos{rope}"], inputs[f"sin{rope}"]
        if not in_kernel:
            qkv[0] = self._rotate(qkv[0], spec.num_heads, inputs[f"cos_rows{rope}"], inputs[f"sin_rows{rope}"])
            qkv[1] = self._rotate(qkv[1], spec.num_kv_heads, inputs[f"cos_rows{rope}"], inputs[f"sin_rows{rope}"])
            cos = sin = ""
        # GroupQueryAttention takes [batch, seq, ...]: packed q|k|v as the query, key and value absent.
        q, k, v = [g.op("Reshape", [t, inputs["batch_seq"]]) for t in qkv] + [""] * (3 - len(qkv))
        attrs: dict[str, Any] = {
            "num_heads": spec.num_heads,
            "kv_num_heads": spec.num_kv_heads,
            "do_rotary": int(in_kernel),
            "rotary_interleaved": int(spec.rope_interleaved),
            "scale": float(spec.attn_scale if spec.attn_scale is not None else spec.head_dim**-0.5),
        }
        if spec.attn_softcap:
            attrs["softcap"] = float(spec.attn_softcap)
        if window is not None:  # per layer: Gemma-2/3 alternate sliding and full layers
            attrs["local_window_size"] = int(window)
        out = g.op(
            "GroupQueryAttention",
            [
                q,
                k,
                v,
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                inputs["seqlens_k"],
                inputs["total_sequence_length"],
                cos,
                sin,
            ],
            [g.fresh("attn"), *outputs],
            domain=MS_DOMAIN,
            **attrs,
        )
        flat = g.op("Reshape", [out[0], g.ints(-1, spec.num_heads * spec.head_dim)])
        return self.linear(flat, [f"{p}.o_proj"])[0]

    def _rotate(self, x: str, heads: int, cos: str, sin: str) -> str:
        """Rope on x [rows, heads * head_dim] with plain ops, where the kernel cannot (kernel_rotates):
        the first rotary_dim channels of each head rotate, as halves or interleaved pairs; cos, sin
        [rows, 1, rotary_dim / 2] are the rows' own."""
        g, spec = self.g, self.spec
        dim = rotary_dim(spec)
        per_head = g.op("Reshape", [x, g.ints(0, heads, spec.head_dim)])
        rot, rest = g.op("Split", [per_head, g.ints(dim, spec.head_dim - dim)], 2, axis=-1)
        if spec.rope_interleaved:  # pairs (0, 1), (2, 3), ...: GLM
            pairs = g.op("Reshape", [rot, g.ints(0, heads, dim // 2, 2)])
            x1, x2 = g.op("Split", [pairs, g.ints(1, 1)], 2, axis=-1)
            x1, x2 = [g.op("Squeeze", [t, g.ints(-1)]) for t in (x1, x2)]
        else:  # the halves: Llama's rotate_half
            x1, x2 = g.op("Split", [rot, g.ints(dim // 2, dim // 2)], 2, axis=-1)
        out1 = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
        out2 = g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])])
        if spec.rope_interleaved:
            stacked = g.op("Concat", [g.op("Unsqueeze", [t, g.ints(-1)]) for t in (out1, out2)], axis=-1)
            rotated = g.op("Reshape", [stacked, g.ints(0, heads, dim)])
        else:
            rotated = g.op("Concat", [out1, out2], axis=-1)
        whole = g.op("Concat", [rotated, rest], axis=-1)
        return str(g.op("Reshape", [whole, g.ints(0, heads * spec.head_dim)]))

    def _head_norm(self, x: str, name: str, heads: int) -> str:
        g = self.g
        per_head = g.op("Reshape", [x, g.ints(0, heads, self.spec.head_dim)])
        normed = g.op(
            "SimplifiedLayerNormalization", [per_head, self.norm_weight(name)], axis=-1, epsilon=self.spec.rms_norm_eps
        )
        return str(g.op("Reshape", [normed, g.ints(0, heads * self.spec.head_dim)]))

    def mlp(self, i: int, x: str) -> str:
        p = f"model.layers.{i}.mlp"
        return self.moe(x, p) if i in (self.spec.moe_layers or []) else self._gated_mlp(x, p)

    def _gated_mlp(self, x: str, p: str) -> str:
        gate, up = self.linear(x, [f"{p}.gate_proj", f"{p}.up_proj"])
        act = _ACTIVATIONS[self.spec.hidden_act](self.g, gate)
        return self.linear(self.g.op("Mul", [act, up]), [f"{p}.down_proj"])[0]

    def moe(self, x: str, p: str) -> str:
        """Routed experts as `com.microsoft.MoE` (softmax over the router's logits, top-k, weights
        renormalized with norm_topk_prob; the stacked float experts, gate and up rows interleaved as
        its CPU kernel takes them), plus the shared expert, sigmoid-gated (Qwen2-MoE)."""
        spec, g = self.spec, self.g
        logits = self.linear(x, [f"{p}.gate"])[0]
        gate_up = self._dense(f"{p}.experts.gate_up_proj")  # [E, 2I, H]: gate rows, then up rows
        experts, rows, hidden = gate_up.shape
        size = rows // 2
        interleaved = np.stack([gate_up[:, :size], gate_up[:, size:]], axis=2).reshape(experts, rows, hidden)
        out = g.op(
            "MoE",
            [
                x,
                logits,
                g.init(f"{p}.experts.gate_up_interleaved", np.ascontiguousarray(interleaved)),
                "",
                g.init(f"{p}.experts.down_proj", self._dense(f"{p}.experts.down_proj")),
            ],
            domain=MS_DOMAIN,
            k=spec.num_experts_per_tok,
            normalize_routing_weights=int(spec.norm_topk_prob),
            activation_type="swiglu",  # silu(gate) * up with these alpha and beta
            activation_alpha=1.0,
            activation_beta=0.0,
            swiglu_fusion=1,  # gate and up rows interleaved: the one layout the CPU kernel takes
        )
        if not spec.shared_expert_intermediate_size:
            return str(out)
        shared = self._gated_mlp(x, f"{p}.shared_expert")
        if spec.shared_expert_gated:
            gate = self.linear(x, [f"{p}.shared_expert_gate"])[0]
            shared = g.op("Mul", [g.op("Sigmoid", [gate]), shared])
        return str(g.op("Add", [out, shared]))

    def skip_norm(self, x: str, residual: str, prefix: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual), the norm named `prefix`."""
        op = "SkipLayerNormalization" if self.spec.norm == "layer" else "SkipSimplifiedLayerNormalization"
        out, total = self.g.op(
            op,
            [x, residual, *self._norm_params(prefix)],
            [self.g.fresh("normed"), "", "", self.g.fresh("residual")],
            domain=MS_DOMAIN,
            epsilon=self.spec.rms_norm_eps,
        )[::3]
        return out, total

    def logits(self, hidden: str, rows: str) -> str:
        spec, g = self.spec, self.g
        picked = g.op("Gather", [hidden, rows], axis=0)
        if spec.tie_word_embeddings:
            name = "model.embed_tokens"
            mapped = self._nbits(f"{name}.weight")
            if mapped is None:
                out = g.op("Gemm", [picked, f"{name}.weight"], transB=1)
            else:
                out = self._matmul_nbits(picked, g.nbits_weight(name, mapped), mapped)
        else:
            out = self.linear(picked, ["lm_head"])[0]
        if spec.final_softcap:
            cap = g.const(np.array(spec.final_softcap, np.float32))
            out = g.op("Mul", [g.op("Tanh", [g.op("Div", [out, cap])]), cap])
        return str(out)


# GroupQueryAttention's CPU kernel rotates q and k itself only for heads a multiple of
# KERNEL_HEAD_MULTIPLE wide, and a partial rope (tables narrower than head_dim / 2) only when the
# tables' width is a multiple of KERNEL_ROTARY_MULTIPLE: onnxruntime 1.32's checks, found by
# running it (without rope it takes any head size).
KERNEL_HEAD_MULTIPLE = 16
KERNEL_ROTARY_MULTIPLE = 8


def rotary_dim(spec: ModelSpec) -> int:
    """The channels of each head that rope rotates (the first ones; all but for partial rope)."""
    return int(spec.head_dim * spec.partial_rotary_factor)


def kernel_rotates(spec: ModelSpec) -> bool:
    """Whether GroupQueryAttention can rotate q and k itself; else the graph does it (_rotate)."""
    dim = rotary_dim(spec)
    if spec.head_dim % KERNEL_HEAD_MULTIPLE or long_rope_after(spec) is not None:
        return False
    return dim == spec.head_dim or (dim // 2) % KERNEL_ROTARY_MULTIPLE == 0


def long_rope_after(spec: ModelSpec) -> int | None:
    """Phi-3's longrope: the sequence length past which a sequence rotates with the long factors
    (the graph's `long_rope` input says which rows do); None for every other model."""
    if rope_kind(spec.rope_scaling) != "longrope":
        return None
    assert spec.rope_scaling is not None
    return int(spec.rope_scaling["original_max_position_embeddings"])


def rope_tables(
    spec: ModelSpec, max_positions: int, local: bool = False, long: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [max_positions, rotary_dim / 2]: GroupQueryAttention's rotary caches (the
    attention factor of YaRN-style scalings folded in, as model/rope.py does). Partial rotary
    models (StableLM, GLM-4) rotate only the first rotary_dim channels, which the kernel reads off
    the tables' width. `local`: the sliding layers' own table (Gemma-3's rope_local_theta, unscaled,
    as model/decoder.py's _ropes). `long`: longrope's long factors."""
    dim = rotary_dim(spec)
    if local:
        assert spec.rope_local_theta is not None
        inv_freq, attention = inverse_frequencies(dim, spec.rope_local_theta, None, False)
    else:
        inv_freq, attention = inverse_frequencies(dim, spec.rope_theta, spec.rope_scaling, long)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return (freqs.cos() * attention).numpy(), (freqs.sin() * attention).numpy()


def _row_tables(g: _Graph, spec: ModelSpec, inputs: dict[str, str]) -> None:
    """Each row's own cos and sin ([rows, 1, rotary_dim / 2]) for rope outside the kernel: row
    (b, s) of a [batch, seq] step sits at position seqlens_k[b] + 1 - seq + s (the runner's chunks
    and decodes are never padded within a row); longrope's long rows read the long half of the
    tables, max_position_embeddings further on."""
    shape = g.op("Shape", ["input_ids"])
    seq = g.op("Gather", [shape, g.ints(1)], axis=0)  # [1]
    last = g.op("Cast", [g.op("Unsqueeze", ["seqlens_k", g.ints(-1)])], to=TensorProto.INT64)  # [batch, 1]
    start = g.op("Sub", [g.op("Add", [last, g.ints(1)]), seq])
    if long_rope_after(spec) is not None:
        long = g.op("Cast", [g.op("Unsqueeze", [LONG_ROPE, g.ints(-1)])], to=TensorProto.INT64)
        start = g.op("Add", [start, g.op("Mul", [long, g.ints(spec.max_position_embeddings)])])
    steps = g.op(
        "Range", [g.const(np.array(0, np.int64)), g.op("Squeeze", [seq, g.ints(0)]), g.const(np.array(1, np.int64))]
    )
    positions = g.op("Reshape", [g.op("Add", [start, steps]), g.ints(-1)])  # [batch * seq]
    for name in [k for k in inputs if k.startswith(("cos", "sin"))]:
        rows = g.op("Gather", [inputs[name], positions], axis=0)
        inputs[name.replace("cos", "cos_rows").replace("sin", "sin_rows")] = g.op("Unsqueeze", [rows, g.ints(1)])


def build_graph(
    spec: ModelSpec,
    weights: WeightSource,
    names: set[str],
    data: ExternalData,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> tuple[onnx.ModelProto, Mapping]:
    """The model's graph (module docstring), its initializers appended to `data` as they are made."""
    problem = unsupported(spec)
    assert problem is None, problem  # the target checks before building
    g = _Graph(data, accuracy_level)
    w = _Writer(spec, weights, names, g)
    f32, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    kv_shape: list[str | int | None] = ["batch", spec.num_kv_heads, "max_len", spec.head_dim]
    graph_inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
        helper.make_tensor_value_info("logits_rows", i64, ["rows"]),
    ]
    graph_outputs = [helper.make_tensor_value_info("logits", f32, ["rows", spec.vocab_size])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            graph_inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_shape))
            graph_outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, kv_shape))
    cos, sin = rope_tables(spec, spec.max_position_embeddings)
    if long_rope_after(spec) is not None:  # rows [max_positions, 2 * max_positions): the long factors
        graph_inputs.append(helper.make_tensor_value_info(LONG_ROPE, TensorProto.BOOL, ["batch"]))
        long_cos, long_sin = rope_tables(spec, spec.max_position_embeddings, long=True)
        cos, sin = np.concatenate([cos, long_cos]), np.concatenate([sin, long_sin])
    inputs = {
        "seqlens_k": "seqlens_k",
        "total_sequence_length": "total_sequence_length",
        "cos": g.init("rope.cos", cos),
        "sin": g.init("rope.sin", sin),
        # [batch, seq, -1]: the shape attention's inputs take, from the ids' own shape
        "batch_seq": g.op("Concat", [g.op("Shape", ["input_ids"]), g.ints(-1)], axis=0),
    }
    if spec.rope_local_theta is not None:  # Gemma-3: the sliding layers rotate with their own base
        local_cos, local_sin = rope_tables(spec, spec.max_position_embeddings, local=True)
        inputs["cos.sliding"] = g.init("rope.sliding.cos", local_cos)
        inputs["sin.sliding"] = g.init("rope.sliding.sin", local_sin)
    if not kernel_rotates(spec):
        _row_tables(g, spec, inputs)
    h = w.embed("input_ids")
    residual: str | None = None
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        if residual is None:
            x, residual = w.norm(h, f"{p}.input_layernorm"), h
        else:
            x, residual = w.skip_norm(h, residual, f"{p}.input_layernorm")
        attn = w.attention(i, x, inputs, [f"present.{i}.key", f"present.{i}.value"])
        if spec.sandwich_norm:  # Gemma-2/3, GLM-4: the block's output is normed before the residual add
            attn = w.norm(attn, f"{p}.post_self_attn_layernorm")
        x, residual = w.skip_norm(attn, residual, f"{p}.post_attention_layernorm")
        h = w.mlp(i, x)
        if spec.sandwich_norm:
            h = w.norm(h, f"{p}.post_mlp_layernorm")
    assert residual is not None
    final, _ = w.skip_norm(h, residual, "model.norm")
    logits = w.logits(final, "logits_rows")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    graph = helper.make_graph(g.nodes, "llmc", graph_inputs, graph_outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="llmc",
    )
    model.ir_version = IR_VERSION
    return model, w.mapping
