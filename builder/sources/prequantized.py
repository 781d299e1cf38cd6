"""Pre-quantized Hugging Face checkpoints: GPTQ (v1 and v2 zeros), AWQ GEMM and compressed-tensors
pack-quantized int weights, read and repacked exactly into the GGML legacy blocks every llmc kernel
already consumes.

Every supported variant is an integer q, a per-group scale s and zero z with w = (q - z) * s:
- 4-bit with every zero 8 (symmetric): q4_0 blocks, d = s, exact;
- 4-bit otherwise: q4_1 blocks, d = s and m = -z * s rounded once to f16 (exact when -z * s fits
  an f16, else off by at most half an f16 ulp of m);
- 8-bit with every zero 128 (symmetric GPTQ): q8_0 blocks, d = s, q - 128, exact.
A group of g input columns (g a multiple of 32, or the whole row) becomes g / 32 blocks that repeat
its (d, m). With act-order (GPTQ `desc_act`, compressed-tensors `actorder: group`) a group's columns
are scattered: the build sorts the input columns by group once (a permutation P), stores W[:, P] as
blocks and P as an int32 tensor `<layer>.input_perm`; the layer gathers x[..., P] at run time.
Scales arrive as f16 (GPTQ, AWQ) or as the model's dtype (compressed-tensors); a scale that is not
an f16 is rounded to one, and the build report shows the resulting error per tensor.

On-disk layouts (K input features, N output features, G groups; see docs/user-guide.md):
- GPTQ: qweight int32 [K/8, N] (8 nibbles along K, low first), qzeros int32 [G, N/8] (8 along N),
  scales f16 [G, N], g_idx int32 [K]; "gptq" (v1) checkpoints store zero - 1, "gptq_v2" the zero.
- AWQ GEMM: qweight int32 [K, N/8] and qzeros int32 [G, N/8], nibble i holding column
  8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; scales f16 [G, N].
- compressed-tensors pack-quantized: weight_packed int32 [N, K/8] of q + 8 (8 along K),
  weight_scale [N, G], weight_zero_point int32 [N/8, G] (asymmetric; packed along N),
  weight_g_idx int32 [K] (actorder group), weight_shape [2].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llmc.builder.sources.base import ModelSource, TensorMeta
from llmc.builder.sources.safetensors_folder import read_hf_folder, read_json
from llmc.errors import BadModelError

GPTQ_V1, GPTQ_V2 = "gptq-v1", "gptq-v2"
AWQ_GEMM = "awq-gemm"
COMPRESSED_TENSORS = "compressed-tensors-pack-quantized"
SOURCE_FORMATS = (GPTQ_V1, GPTQ_V2, AWQ_GEMM, COMPRESSED_TENSORS)
# How the artifact stores a pre-quantized source's weights (recorded in the manifest).
LAYOUT_BLOCKS = "ggml-legacy-blocks"
LAYOUT_DEQUANTIZED = "dequantized"

BLOCK = 32  # weights per GGML legacy block: a quantization group must be whole blocks
_WORD_BITS = 32  # the checkpoints pack their integers into int32 words
_NIBBLE = 0xF
_BYTE = 0xFF
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a word holds column 8c + _AWQ_ORDER[i]
_SUPPORTED_BITS = {GPTQ_V1: (4, 8), GPTQ_V2: (4, 8), AWQ_GEMM: (4,), COMPRESSED_TENSORS: (4,)}
# GPTQ's `checkpoint_format` values: the two zero conventions llmc reads; others are kernel layouts.
_GPTQ_FORMATS = {"gptq": GPTQ_V1, "gptq_v2": GPTQ_V2}
# Float dtypes of the non-quantized tensors and of the scales.
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_INT_DTYPES = {"I32": torch.int32, "I64": torch.int64}
# The per-layer tensors of each format, by role: (packed weights, scales, zeros, group index).
_SUFFIXES = {
    "gptq": ("qweight", "scales", "qzeros", "g_idx"),
    "awq": ("qweight", "scales", "qzeros", None),
    "ct": ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"),
}
_FAMILIES = {GPTQ_V1: "gptq", GPTQ_V2: "gptq", AWQ_GEMM: "awq", COMPRESSED_TENSORS: "ct"}
_CT_SHAPE = "weight_shape"  # compressed-tensors' record of the float weight's shape


@dataclass(frozen=True)
class Scheme:
    """What `quantization_config` says, validated: the source format and its parameters."""

    source_format: str
    bits: int
    group_size: int  # -1: one group per row (per-channel)
    act_order: bool
    symmetric: bool

    @property
    def family(self) -> str:
        """The tensor layout: "gptq" (v1 and v2 differ only in the zeros), "awq" or "ct"."""
        return _FAMILIES[self.source_format]


@dataclass(frozen=True)
class Repack:
    """How one weight was stored and what that cost against the reference dequantization."""

    format: str
    rel_rmse: float
    max_abs_err: float


def prequantized_config(folder: Path) -> dict[str, Any] | None:
    """The folder's `quantization_config`, when its config.json has one."""
    if not (folder / "config.json").is_file():
        return None
    qc: dict[str, Any] | None = read_json(folder / "config.json").get("quantization_config")
    return qc


def _bad(msg: str) -> BadModelError:
    return BadModelError(msg + "; llmc reads GPTQ (4/8-bit), AWQ GEMM and compressed-tensors pack-quantized int4")


def scheme_from_config(qc: Any) -> Scheme:
    """Validate `quantization_config`; unsupported variants raise BadModelError naming the field."""
    if not isinstance(qc, dict):
        raise _bad("config.json: quantization_config is not an object")
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt_name = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if fmt_name not in _GPTQ_FORMATS:
            raise _bad(
                f"config.json: quantization_config.checkpoint_format {fmt_name!r} is a kernel-specific layout "
                "(marlin, bitblas, exllama, ...) llmc cannot read; save the model in the gptq or gptq_v2 format"
            )
        fmt = _GPTQ_FORMATS[str(fmt_name)]
        bits = _int_field(qc, "bits")
        group = _int_field(qc, "group_size", -1)
        return _checked(Scheme(fmt, bits, group, bool(qc.get("desc_act", False)), bool(qc.get("sym", True))))
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _bad(f"config.json: quantization_config.version {version!r} (AWQ {version} layout) is not supported")
        if qc.get("zero_point", True) is not True:
            raise _bad("config.json: quantization_config.zero_point false (AWQ without zeros) is not supported")
        bits = _int_field(qc, "bits", qc.get("w_bit"))
        group = _int_field(qc, "group_size", qc.get("q_group_size"))
        return _checked(Scheme(AWQ_GEMM, bits, group, False, False))
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(qc)
    raise _bad(f"config.json: quantization_config.quant_method {method!r} is not supported")


def _int_field(qc: dict[str, Any], key: str, default: Any = None) -> int:
    value = qc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"config.json: quantization_config.{key} is {value!r}, expected an integer")
    return value


def _checked(s: Scheme) -> Scheme:
    if s.bits not in _SUPPORTED_BITS[s.source_format]:
        raise _bad(f"config.json: quantization_config bits={s.bits} ({s.source_format}) is not supported")
    if s.group_size != -1 and (s.group_size <= 0 or s.group_size % BLOCK):
        raise _bad(
            f"config.json: quantization_config group_size={s.group_size} is not -1 or a multiple of {BLOCK} "
            "(llmc stores each group as whole 32-weight blocks)"
        )
    return s


def _compressed_tensors_scheme(qc: dict[str, Any]) -> Scheme:
    if qc.get("quantization_status", "compressed") != "compressed":
        raise _bad(f"config.json: quantization_config.quantization_status {qc.get('quantization_status')!r}")
    sparsity = qc.get("sparsity_config")
    if sparsity and str(sparsity.get("format", "dense")) != "dense":
        raise _bad(
            f"config.json: quantization_config.sparsity_config format {sparsity.get('format')!r} "
            "(2:4 or other sparsity) is not supported"
        )
    if qc.get("kv_cache_scheme"):
        raise _bad("config.json: quantization_config.kv_cache_scheme (a quantized KV cache) is not supported")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _bad("config.json: quantization_config.config_groups is missing")
    schemes = set()
    for name, group in groups.items():
        where = f"config.json: quantization_config.config_groups.{name}"
        if not isinstance(group, dict):
            raise _bad(f"{where} is not an object")
        fmt = group.get("format") or qc.get("format")
        if fmt != "pack-quantized":
            raise _bad(f"{where}.format {fmt!r} is not supported (only pack-quantized int weights)")
        for field in ("input_activations", "output_activations"):
            if group.get(field):
                raise _bad(f"{where}.{field} is set: activation quantization is not supported")
        w = group.get("weights")
        if not isinstance(w, dict):
            raise _bad(f"{where}.weights is missing")
        if w.get("type") != "int" or w.get("dynamic"):
            raise _bad(f"{where}.weights.type {w.get('type')!r} (dynamic={w.get('dynamic')}) is not supported")
        strategy = w.get("strategy")
        if strategy not in ("group", "channel"):
            raise _bad(f"{where}.weights.strategy {strategy!r} is not supported (group or channel)")
        group_size = -1 if strategy == "channel" else _int_field(w, "group_size")
        actorder = w.get("actorder")
        if actorder not in (None, "group", "weight", "static"):
            raise _bad(f"{where}.weights.actorder {actorder!r} is not supported")
        bits = _int_field(w, "num_bits")
        schemes.add(
            _checked(Scheme(COMPRESSED_TENSORS, bits, group_size, actorder == "group", bool(w.get("symmetric", True))))
        )
    if len(schemes) != 1:
        raise _bad("config.json: quantization_config.config_groups mix several weight schemes")
    return schemes.pop()


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words → their `32 / bits` integers (lowest bits first) laid out along `dim`, as int16."""
    per_word = _WORD_BITS // bits
    shifts = torch.arange(0, _WORD_BITS, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    values = (words.unsqueeze(-1) >> shifts) & mask  # [..., per_word] after the word's own index
    values = values.to(torch.int16)
    if dim == 0:  # [R, C, per_word] -> [R, per_word, C] -> [R * per_word, C]
        return values.permute(0, 2, 1).reshape(words.shape[0] * per_word, words.shape[1])
    return values.reshape(words.shape[0], words.shape[1] * per_word)


@dataclass
class _Linear:
    """One quantized layer in a common form: w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g], g = g_idx[k]."""

    q: torch.Tensor  # int16 [N, K]
    scale: torch.Tensor  # float [N, G], the checkpoint's dtype
    zero: torch.Tensor  # int16 [N, G]
    g_idx: torch.Tensor  # int64 [K]

    def reference(self) -> torch.Tensor:
        """The dequantized weight in float32 (exact: small integers times a scale of <= 24 bits)."""
        return (self.q - self.zero[:, self.g_idx]).float() * self.scale.float()[:, self.g_idx]


class PrequantizedSource(ModelSource):
    """A Hugging Face folder with `quantization_config`: canonical `...weight` names for the quantized
    layers, whose `blocks` are the exact repack and whose `load` is the reference dequantization."""

    def __init__(self, folder: Path, name: str, weights_folder: Path | None = None) -> None:
        config, tokenizer, generation, files = read_hf_folder(folder, weights_folder)
        self.scheme = scheme_from_config(config.get("quantization_config"))
        super().__init__("safetensors", name, config, tokenizer, generation, files)
        self._where: dict[str, Path] = {}
        self._raw: dict[str, tuple[list[int], str]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if key.endswith("rotary_emb.inv_freq"):
                        continue  # older checkpoints saved the rope table; it is recomputed
                    sl = handle.get_slice(key)
                    self._where[key] = file
                    self._raw[key] = (list(sl.get_shape()), sl.get_dtype())
        suffixes = _SUFFIXES[self.scheme.family]
        self._layers = sorted(k.removesuffix("." + suffixes[0]) for k in self._raw if k.endswith("." + suffixes[0]))
        if not self._layers:
            raise _bad(f"{folder}: quantization_config is {self.scheme.source_format} but no tensor is *.{suffixes[0]}")
        self._meta: dict[str, TensorMeta] = {}
        owned = {f"{layer}.{s}" for layer in self._layers for s in (*suffixes, _CT_SHAPE) if s}
        for key, (shape, dtype) in self._raw.items():
            if key in owned:
                continue
            if dtype not in _FLOAT_DTYPES:
                raise _bad(f"tensor {key} has dtype {dtype} and is not part of a {self.scheme.source_format} layer")
            self._meta[key] = TensorMeta(shape, _FLOAT_DTYPES[dtype])
        self._perms: dict[str, torch.Tensor | None] = {}
        self._formats: dict[str, str] = {}
        self._repacks: dict[str, Repack] = {}
        for layer in self._layers:
            n, k = self._check_shapes(layer)
            self._meta[layer + ".weight"] = TensorMeta([n, k], torch.float32)

    # ---- reading and validating one layer --------------------------------------------------------------

    def _field(self, layer: str, role: int) -> str | None:
        suffix = _SUFFIXES[self.scheme.family][role]
        return None if suffix is None else f"{layer}.{suffix}"

    def _expect(self, key: str, shape: list[int], dtypes: tuple[str, ...]) -> None:
        if key not in self._raw:
            raise _bad(f"tensor {key} is missing ({self.scheme.source_format} needs it)")
        got, dtype = self._raw[key]
        if got != shape:
            raise _bad(f"tensor {key} has shape {got}, expected {shape} ({self.scheme.source_format})")
        if dtype not in dtypes:
            raise _bad(f"tensor {key} has dtype {dtype}, expected one of {', '.join(dtypes)}")

    def _groups(self, k: int) -> int:
        """Groups per row: the last may be short (SmolLM2's 576 = 4 * 128 + 64); `_group_permutation`
        checks every group is whole 32-weight blocks."""
        g = self.scheme.group_size
        return 1 if g == -1 else -(-k // g)

    def _check_shapes(self, layer: str) -> tuple[int, int]:
        """(N, K) of the layer, every tensor's shape and dtype checked against them."""
        per = _WORD_BITS // self.scheme.bits
        packed = self._field(layer, 0)
        assert packed is not None
        shape, dtype = self._raw[packed]
        if len(shape) != 2 or dtype != "I32":
            raise _bad(f"tensor {packed} has shape {shape} and dtype {dtype}, expected a 2-D I32 tensor")
        family = self.scheme.family
        if family == "gptq":
            k, n = shape[0] * per, shape[1]
        elif family == "awq":
            k, n = shape[0], shape[1] * per
        else:
            n, k = shape[0], shape[1] * per
            self._expect(f"{layer}.{_CT_SHAPE}", [2], tuple(_INT_DTYPES))
            recorded = [int(v) for v in self._tensor(f"{layer}.{_CT_SHAPE}")]
            if recorded != [n, k]:
                raise _bad(f"tensor {layer}.{_CT_SHAPE} is {recorded}, but {packed} packs a [{n}, {k}] weight")
        groups = self._groups(k)
        scales, zeros, g_idx = (self._field(layer, r) for r in (1, 2, 3))
        assert scales is not None and zeros is not None
        floats = tuple(_FLOAT_DTYPES)
        if family == "ct":
            self._expect(scales, [n, groups], floats)
            if not self.scheme.symmetric:
                self._expect(zeros, [-(-n // per), groups], ("I32",))
        else:
            self._expect(scales, [groups, n], floats)
            if n % per:
                raise _bad(f"layer {layer}: output width {n} is not a multiple of {per} (qzeros packs {per} per word)")
            self._expect(zeros, [groups, n // per], ("I32",))
        if g_idx is not None and g_idx in self._raw:
            self._expect(g_idx, [k], tuple(_INT_DTYPES))
        elif self.scheme.act_order:
            raise _bad(f"tensor {g_idx} is missing (act-order checkpoints need it)")
        return n, k

    def _tensor(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def _linear(self, layer: str) -> _Linear:
        s, bits = self.scheme, self.scheme.bits
        n, k = self._meta[layer + ".weight"].shape
        groups = self._groups(k)
        scales, zeros, g_key = (self._field(layer, r) for r in (1, 2, 3))
        assert scales is not None and zeros is not None
        words = self._tensor(f"{layer}.{_SUFFIXES[s.family][0]}")
        if s.family == "gptq":
            q = _unpack(words, bits, 0).t()
            zero = _unpack(self._tensor(zeros), bits, 1).t() + (1 if s.source_format == GPTQ_V1 else 0)
            scale = self._tensor(scales).t()
        elif s.family == "awq":
            inverse = torch.tensor(sorted(range(len(_AWQ_ORDER)), key=_AWQ_ORDER.__getitem__))
            q = _unpack(words, bits, 1).view(k, -1, len(_AWQ_ORDER))[:, :, inverse].reshape(k, n).t()
            zero = _unpack(self._tensor(zeros), bits, 1).view(groups, -1, len(_AWQ_ORDER))[:, :, inverse]
            zero = zero.reshape(groups, n).t()
            scale = self._tensor(scales).t()
        else:
            offset = 1 << (bits - 1)  # compressed-tensors stores the signed q as q + 2^(bits-1)
            q = _unpack(words, bits, 1)[:, :k]
            scale = self._tensor(scales)
            if s.symmetric:
                zero = torch.full((n, groups), offset, dtype=torch.int16)
            else:
                # The signed zero point is packed as zp + 2^(bits-1) too, so q - zp needs no offset.
                zero = _unpack(self._tensor(zeros), bits, 0)[:n]
        g_idx = self._g_idx(layer, g_key, k, groups)
        return _Linear(q.contiguous(), scale.contiguous(), zero.contiguous(), g_idx)

    def _g_idx(self, layer: str, key: str | None, k: int, groups: int) -> torch.Tensor:
        default = torch.arange(k) // (k if self.scheme.group_size == -1 else self.scheme.group_size)
        if key is None or key not in self._raw:
            return default
        g_idx = self._tensor(key).long()
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise _bad(f"tensor {key} has group indices outside 0..{groups - 1}")
        return g_idx

    # ---- the ModelSource interface ----------------------------------------------------------------------

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._meta)

    def _layer_of(self, name: str) -> str | None:
        layer = name.removesuffix(".weight")
        return layer if name.endswith(".weight") and layer in self._layers else None

    def load(self, name: str) -> torch.Tensor:
        layer = self._layer_of(name)
        if layer is None:
            return self._tensor(name)
        return self._linear(layer).reference()

    def block_format(self, name: str) -> str | None:
        layer = self._layer_of(name)
        if layer is None:
            return None
        if name not in self._formats:
            self._formats[name] = self._format_of(layer)
        return self._formats[name]

    def _format_of(self, layer: str) -> str:
        """q8_0 for 8-bit, q4_0 where every zero is the centre 8 (symmetric), else q4_1: read from
        the zeros themselves (a few KiB), not from the config's `sym`, so a mislabelled checkpoint
        still gets an exact form."""
        if self.scheme.bits == 8:
            return "q8_0"
        zeros = self._field(layer, 2)
        if self.scheme.family == "ct" and self.scheme.symmetric:
            return "q4_0"
        assert zeros is not None
        values = _unpack(self._tensor(zeros), self.scheme.bits, 0 if self.scheme.family == "ct" else 1)
        if self.scheme.source_format == GPTQ_V1:
            values = values + 1
        return "q4_0" if bool((values == 1 << (self.scheme.bits - 1)).all()) else "q4_1"

    def input_permutation(self, name: str) -> torch.Tensor | None:
        """The order (int32) `blocks(name)` stores the input columns in, groups contiguous; None
        where that is the identity (no act-order). Reads only the layer's g_idx."""
        layer = self._layer_of(name)
        if layer is None:
            return None
        if name not in self._perms:
            _, k = self._meta[name].shape
            key = self._field(layer, 3)
            perm = _group_permutation(self._g_idx(layer, key, k, self._groups(k)), key or name)
            self._perms[name] = None if torch.equal(perm, torch.arange(k)) else perm.to(torch.int32)
        return self._perms[name]

    def blocks(self, name: str) -> torch.Tensor:
        layer = self._layer_of(name)
        fmt = self.block_format(name)
        assert layer is not None and fmt is not None, name
        lin = self._linear(layer)
        stored = self.input_permutation(name)
        perm = torch.arange(lin.q.shape[1]) if stored is None else stored.long()
        blocks = repack(lin, perm, fmt, name)
        from llmc.quant.formats import FORMATS

        got = FORMATS[fmt].dequantize(blocks).double()
        ref = lin.reference()[:, perm].double()
        norm = ref.norm()
        err = (got - ref).norm()
        self._repacks[name] = Repack(
            fmt, float((err / norm).item()) if norm > 0 else 0.0, float((got - ref).abs().max().item())
        )
        return blocks

    def repack_error(self, name: str) -> tuple[float, float] | None:
        info = self._repacks.get(name)
        return None if info is None else (info.rel_rmse, info.max_abs_err)

    @property
    def quantization(self) -> dict[str, Any] | None:
        s = self.scheme
        return {"source_format": s.source_format, "bits": s.bits, "group_size": s.group_size, "act_order": s.act_order}


def _group_permutation(g_idx: torch.Tensor, name: str) -> torch.Tensor:
    """The input-column order with each group's columns contiguous (stable: identity when sorted)."""
    perm = torch.sort(g_idx, stable=True).indices
    counts = torch.bincount(g_idx)
    if bool((counts % BLOCK).any()):
        raise _bad(f"tensor {name}: a quantization group has a column count that is not a multiple of {BLOCK}")
    return perm


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8)


def repack(lin: _Linear, perm: torch.Tensor, fmt: str, name: str) -> torch.Tensor:
    """The layer's GGML blocks in format `fmt` over the input columns in `perm` order."""
    n = lin.q.shape[0]
    q = lin.q[:, perm]
    group_of_block = lin.g_idx[perm].view(-1, BLOCK)[:, 0]  # one group per block (checked by the caller)
    scale = lin.scale.float()[:, group_of_block].reshape(-1, 1)
    zero = lin.zero[:, group_of_block].reshape(-1, 1)
    blocks_q = q.reshape(-1, BLOCK)
    if fmt == "q8_0":
        if bool((zero != 1 << 7).any()):
            raise _bad(f"tensor {name}: 8-bit zeros other than 128 (asymmetric 8-bit) have no exact llmc form")
        qs = (blocks_q - (1 << 7)).to(torch.int8).view(torch.uint8)
        return torch.cat((_f16(scale), qs), dim=-1).view(n, -1)
    nib = blocks_q.to(torch.uint8)
    qs = (nib[:, : BLOCK // 2] & _NIBBLE) | ((nib[:, BLOCK // 2 :] & _NIBBLE) << 4)
    if fmt == "q4_0":  # block_format chose it: every zero is 8
        return torch.cat((_f16(scale), qs), dim=-1).view(n, -1)
    d = scale.to(torch.float16).float()
    m = -zero.float() * d  # exact in float32; rounded once, to the block's f16 m
    return torch.cat((_f16(d), _f16(m), qs), dim=-1).view(n, -1)
