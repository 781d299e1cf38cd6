"""CPU matmuls over GGML-quantized weights, prepared once when the model loads.

Three fast paths, chosen per format by measurement on SmolLM2's shapes (docs/BENCHMARKS.md):
- int4: q4_0, q4_1 and q4k (with a multiple of 16 output rows) are 4-bit values with one
  (scale, offset) per 32 weights, which is exactly what torch's `_weight_int4pack_mm_for_cpu`
  computes, (q - 8) * scale + zero, apart from its bf16 scales. Its packed layout depends on the
  CPU's ISA, so the artifact keeps the GGML blocks and the packing happens here, at load.
- int4 pair: q8_0, q5_0 and q5_1 are each the sum of two such int4 weights (a high and a low
  part, legacy.int4_pair_*): two int4 matmuls read about 1 byte per weight where a bf16
  copy reads 2. That matters for the largest matrix of small models, a q8_0 lm_head, and for the
  q5_0 that K-quant builds fall back to on rows whose width is not a multiple of 256.
- dense: every other format is dequantized once at load into bf16 and multiplied by oneDNN's bf16
  GEMM (the weights then take 2 bytes each in memory; the artifact still holds the blocks).
All take bf16 activations: oneDNN's and the int4 kernel's fast paths are bf16-only on CPUs.
- kernel: with `cpu_kernels` (llmc's own kernel library loaded, kernels/cpu/cpu_kernels.py, built
  for the host's ISA: AVX-512 VNNI, AVX-VNNI or AVX2), every format of kernels/cpu/qmatmul_vnni.py
  takes its quantized matmul instead of int4 or pairs for fewer than KERNEL_DENSE_MIN_ROWS rows:
  2-4x faster than torch's int4 kernel at one row. On AMX hosts, a weight that keeps no dense copy
  (memory) takes the kernel's bf16 path from KERNEL_BF16_MIN_ROWS rows: the dense copies'
  arithmetic, the weights dequantized per block on the fly.

The int4 kernel is the fastest for a few rows of activations but computes slowly: with enough
rows a bf16 GEMM over a dense copy wins, from INT4_DENSE_MIN_ROWS rows for one int4 matmul and
from PAIR_DENSE_MIN_ROWS for an int4 pair (twice the unpacking) on the AVX-512 BF16 machine they
were measured on; a DensePlan carries such thresholds (and the copies' dtype) per host, measured by
kernels/cpu/autotune.py. With `dense_copy` a weight keeps a copy where its plan has a threshold
and each call takes the faster form for its row count; `weight_form` pins the forms
one row count would take (a traced graph cannot branch on its dynamic batch).
The reference is `llmc.quant.formats.reference_qmatmul`: dequantize in float32, then multiply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmc.kernels.casts import cast
from llmc.kernels.cpu import qmatmul_vnni
from llmc.quant import kquants, legacy
from llmc.quant.formats import FORMATS
from llmc.quant.legacy import Int4Parts

INT4_GROUP = 32  # weights per (scale, offset) pair in all three int4 formats
# `innerKTiles` of the int4 packing: 2 is what the CPU kernel is tuned for (torchao uses it).
_INNER_K_TILES = 2
_INT4_ZERO_POINT = 8  # the int4 kernel computes (q - 8) * scale + zero
_INT4_N_MULTIPLE = 16  # the packing interleaves 16 output rows; other row counts take the dense path
COMPUTE_DTYPE = torch.bfloat16
# From how many activation rows a bf16 GEMM over a dense copy beats the int4 kernels. Measured on
# SmolLM2's 30 layers and its lm_head with every weight streamed from memory, 2 threads
# (docs/BENCHMARKS.md): one int4 matmul per weight is still faster at 16 rows (21.9 vs 25.5 ms for
# the layers) and slower at 32 (46.4 vs 37.2); the q8_0 pair loses from 8 rows (lm_head 5.6 vs 4.3).
INT4_DENSE_MIN_ROWS = 32
PAIR_DENSE_MIN_ROWS = 8
# llmc's kernel reads each weight once per 4 activation rows, from cache after the first.
KERNEL_DENSE_MIN_ROWS = 32
# From how many rows a weight on llmc's kernel that keeps no dense copy takes the kernel's bf16
# path instead (AMX hosts: the dense copies' arithmetic on weights dequantized per block, no copy
# kept; kernels/cpu/qmatmul_amx.h). Measured on 3B- and SmolLM2-sized matrices (docs/BENCHMARKS.md):
# 1.1-1.9x the int8 path at 64 rows, mixed at 32, slower at 16.
KERNEL_BF16_MIN_ROWS = 64
DENSE_MIN_ROWS = min(INT4_DENSE_MIN_ROWS, PAIR_DENSE_MIN_ROWS)  # where the first weight switches
# The weight forms a compiled package is traced with, as the row count whose choices it pins:
# "packed" every int4 form, "dense" what DENSE_MIN_ROWS rows take (pairs dense, single int4 packed).
WEIGHT_FORMS = {"packed": 1, "dense": DENSE_MIN_ROWS}
# What serves a weight for few rows: llmc's kernel, torch's int4 kernel, an int4 pair, or (where
# none of them takes the weight) only its dense copy.
SMALL_FORMS = ("kernel", "int4", "pair")


@dataclass(frozen=True)
class DensePlan:
    """From how many activation rows each small-batch form hands a call over to the weight's dense
    copy (None: never, and no copy is kept for it), and the dtype of those copies. The defaults are
    the thresholds measured on an AVX-512 BF16 machine; runtime/backends/cpu_autotune.py measures
    them per host. Weights with no small-batch form keep a bf16 copy whatever the plan: it is their
    only form, and f32 would double their memory."""

    kernel: int | None = KERNEL_DENSE_MIN_ROWS
    int4: int | None = INT4_DENSE_MIN_ROWS
    pair: int | None = PAIR_DENSE_MIN_ROWS
    dtype: torch.dtype = COMPUTE_DTYPE

    def from_rows(self, form: str) -> int | None:
        """The threshold of one of SMALL_FORMS."""
        value: int | None = getattr(self, form)
        return value


DEFAULT_PLAN = DensePlan()


# The codecs split each int4 format into (q, scale, offset); see their int4_parts_* functions.
_INT4_PARTS: dict[str, Callable[[torch.Tensor], Int4Parts]] = {
    "q4_0": legacy.int4_parts_q4_0,
    "q4_1": legacy.int4_parts_q4_1,
    "q4k": kquants.int4_parts_q4k,
}
INT4_FORMATS = tuple(_INT4_PARTS)
_INT4_PAIRS: dict[str, Callable[[torch.Tensor], tuple[Int4Parts, Int4Parts]]] = {
    "q8_0": legacy.int4_pair_q8_0,
    "q5_0": legacy.int4_pair_q5_0,
    "q5_1": legacy.int4_pair_q5_1,
}
PAIR_FORMATS = tuple(_INT4_PAIRS)


def int4_parts(blocks: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q uint8 [rows, cols] in 0..15, scale and offset float32 [rows, cols // 32]: the weight is
    q * scale + offset, exactly."""
    return _INT4_PARTS[fmt](blocks)


def _pack_int4(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale, offset) with w = q * scale + offset → the int4 kernel's packed weight and its
    bf16 [cols // 32, rows, 2] scales and zeros (it computes (q - 8) * scale + zero)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), _INNER_K_TILES)
    zero = offset + _INT4_ZERO_POINT * scale
    return packed, torch.stack([scale.T, zero.T], dim=-1).to(COMPUTE_DTYPE).contiguous()


def _dense_from_parts(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE
) -> torch.Tensor:
    """The bf16 copy of a weight from the (q, scale, offset) parts already unpacked for the int4 or
    VNNI packing: three times faster than dequantizing the blocks again (it counts in every cold
    start), and equal to it, since q * scale is exact in float32 and the sum rounds once either way."""
    rows, groups = scale.shape
    weight = torch.addcmul(offset.unsqueeze(-1), q.view(rows, groups, -1).float(), scale.unsqueeze(-1))
    return weight.view(rows, -1).to(dtype)


class CpuQMatmul(nn.Module):
    """One weight's prepared form; call it with activations [M, K] to get [M, N] in x's dtype.

    The prepared tensors are (non-persistent) buffers so that torch.export sees them as the
    compiled step's constants, which the runtime feeds from this module at load.
    """

    packed: torch.Tensor | None
    scales_zeros: torch.Tensor | None
    packed_low: torch.Tensor | None  # the int4 pair's second half
    scales_zeros_low: torch.Tensor | None
    kernel_weight: torch.Tensor | None  # llmc's kernel's layout, kernels/cpu/qmatmul_vnni.py
    kernel_scales: torch.Tensor | None
    dense: torch.Tensor | None

    def __init__(
        self,
        blocks: torch.Tensor,
        fmt: str,
        dense_copy: bool = False,
        cpu_kernels: bool = False,
        plan: DensePlan = DEFAULT_PLAN,
    ) -> None:
        """`dense_copy`: keep a dense copy where `plan` has a threshold for this weight's form."""
        super().__init__()
        self.fmt = fmt
        self.pinned_rows: int | None = None  # choose forms as for this many rows (weight_form)
        self.out_features = blocks.shape[0]
        info = FORMATS[fmt]
        self.in_features = blocks.shape[1] // info.type_size * info.block_size
        packed = scales_zeros = packed_low = scales_zeros_low = kernel_weight = kernel_scales = dense = None
        self.kernel_bits = 0
        self.plan = plan

        def keep(form: str) -> bool:
            return dense_copy and plan.from_rows(form) is not None

        kernel_forms = self._kernel_forms(blocks, keep("kernel")) if cpu_kernels else None
        self.form = "dense"  # the small-batch form, SMALL_FORMS; "dense" where there is none
        if kernel_forms is not None:
            kernel_weight, kernel_scales, dense = kernel_forms
            self.form = "kernel"
        elif fmt in INT4_FORMATS and self.out_features % _INT4_N_MULTIPLE == 0:
            parts = int4_parts(blocks, fmt)
            packed, scales_zeros = _pack_int4(*parts)
            self.form = "int4"
            if keep("int4"):
                dense = _dense_from_parts(*parts, plan.dtype)
        elif fmt in PAIR_FORMATS and self.out_features % _INT4_N_MULTIPLE == 0:
            high, low = _INT4_PAIRS[fmt](blocks)
            packed, scales_zeros = _pack_int4(*high)
            packed_low, scales_zeros_low = _pack_int4(*low)
            self.form = "pair"
        if self.form == "dense":
            dense = info.dequantize(blocks).to(COMPUTE_DTYPE)
        elif dense is None and keep(self.form):
            dense = info.dequantize(blocks).to(plan.dtype)
        self.dense_from_rows = plan.from_rows(self.form) if self.form != "dense" else 0
        # The kernel's bf16 path for many rows where no dense copy is kept (eager calls only: a
        # traced package pins its forms, weight_form).
        self.bf16_path = (
            kernel_weight is not None and dense is None and self.in_features % 32 == 0
            and qmatmul_vnni.bf16_path_available()
        )  # fmt: skip
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        self.register_buffer("packed_low", packed_low, persistent=False)
        self.register_buffer("scales_zeros_low", scales_zeros_low, persistent=False)
        self.register_buffer("kernel_weight", kernel_weight, persistent=False)
        self.register_buffer("kernel_scales", kernel_scales, persistent=False)
        self.register_buffer("dense", dense, persistent=False)

    def _kernel_forms(
        self, blocks: torch.Tensor, dense_copy: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """llmc's kernel's weight and scales (and the dense copy from the same parts), or None
        where the kernel does not take this weight."""
        if not qmatmul_vnni.fits(self.fmt, self.out_features):
            return None
        if qmatmul_vnni.kquant_form_available(self.fmt):
            self.kernel_bits, weight, scales = qmatmul_vnni.kquant_form(blocks, self.fmt)
            return weight, scales, FORMATS[self.fmt].dequantize(blocks).to(self.plan.dtype) if dense_copy else None
        native = qmatmul_vnni.native_pack(blocks, self.fmt) if not dense_copy else None
        if native is False:
            return None
        if native is not None:  # the library's one-pass conversion: no parts are materialised
            self.kernel_bits, weight, scales = native
            return weight, scales, None
        bits, parts = qmatmul_vnni.parts(blocks, self.fmt)
        if not qmatmul_vnni.scales_fit(*parts[1:]):
            return None
        self.kernel_bits = bits
        weight, scales = qmatmul_vnni.pack(*parts, bits)
        if not dense_copy:
            return weight, scales, None
        if self.fmt in qmatmul_vnni.PARTS_EXACT:
            return weight, scales, _dense_from_parts(*parts, self.plan.dtype)
        return weight, scales, FORMATS[self.fmt].dequantize(blocks).to(self.plan.dtype)

    @staticmethod
    def form_for(fmt: str, out_features: int, cpu_kernels: bool) -> str:
        """The small-batch form a weight of this format and output rows takes (before looking at its
        values: the kernel also refuses scales out of its range, rare, which then take int4 forms)."""
        if cpu_kernels and qmatmul_vnni.fits(fmt, out_features):
            return "kernel"
        if out_features % _INT4_N_MULTIPLE == 0:
            if fmt in INT4_FORMATS:
                return "int4"
            if fmt in PAIR_FORMATS:
                return "pair"
        return "dense"

    @property
    def has_small_batch_form(self) -> bool:
        """Whether a form other than the dense copy serves calls of few rows."""
        return self.packed is not None or self.kernel_weight is not None

    def _pair(self, xc: torch.Tensor) -> torch.Tensor:
        high = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, INT4_GROUP, self.scales_zeros)
        low = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed_low, INT4_GROUP, self.scales_zeros_low)
        return high.float() + low.float()

    def _use_dense(self, rows: int) -> bool:
        if self.dense is None:
            return False
        if not self.has_small_batch_form:
            return True
        if self.dense_from_rows is None:
            return False
        return (rows if self.pinned_rows is None else self.pinned_rows) >= self.dense_from_rows

    def _use_bf16_path(self, rows: int) -> bool:
        return self.bf16_path and self.pinned_rows is None and rows >= KERNEL_BF16_MIN_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_weight is not None and not self._use_dense(x.shape[0]):
            assert self.kernel_scales is not None
            if self._use_bf16_path(x.shape[0]):
                y = qmatmul_vnni.qmatmul_bf16(x, self.kernel_weight, self.kernel_scales, self.kernel_bits)
                return cast(y, x.dtype)
            return cast(qmatmul_vnni.qmatmul(x, self.kernel_weight, self.kernel_scales, self.kernel_bits), x.dtype)
        if self._use_dense(x.shape[0]):
            assert self.dense is not None
            return cast(F.linear(cast(x, self.dense.dtype), self.dense), x.dtype)
        xc = cast(x, COMPUTE_DTYPE)
        if self.packed_low is not None:
            return cast(self._pair(xc), x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, INT4_GROUP, self.scales_zeros)
        return cast(y, x.dtype)


def has_dense_choice(model: nn.Module) -> bool:
    """Whether the "dense" weight form differs from "packed" for `model` (some weight has both
    forms and switches by WEIGHT_FORMS["dense"] rows), so that a package for it is worth compiling."""
    return any(
        m.has_small_batch_form
        and m.dense is not None
        and m.dense_from_rows is not None
        and m.dense_from_rows <= WEIGHT_FORMS["dense"]
        for m in model.modules()
        if isinstance(m, CpuQMatmul)
    )


@contextlib.contextmanager
def weight_form(model: nn.Module, form: str) -> Iterator[None]:
    """Meanwhile every weight of `model` takes the form it takes for WEIGHT_FORMS[form] rows, whatever
    the batch: what torch.export traces for one compiled package."""
    modules = [m for m in model.modules() if isinstance(m, CpuQMatmul)]
    for module in modules:
        module.pinned_rows = WEIGHT_FORMS[form]
    try:
        yield
    finally:
        for module in modules:
            module.pinned_rows = None
