"""Packed int4 kernels vs bf16 GEMMs over dense copies, by number of activation rows.

    python -m llmc.benchmarks.weight_forms

The choice behind kernels/cpu/qmatmul_cpu.py's INT4_DENSE_MIN_ROWS and PAIR_DENSE_MIN_ROWS: every
projection of SmolLM2's 30 layers (one packed int4 weight each, as the default Q4_1 artifact has
them) and its 49152-row lm_head (a q8_0 int4 pair), each a distinct tensor so that the weights
stream from memory as in a real decode step (one weight timed alone stays in the CPU's cache
and flatters the dense form). Random values: the kernels' speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from llmc.kernels.cpu.qmatmul_cpu import COMPUTE_DTYPE, INT4_GROUP

HIDDEN, INTERMEDIATE, KV_WIDTH, LAYERS, VOCAB = 576, 1536, 192, 30, 49152  # SmolLM2-135M
# (out, in) of q, k, v, o, gate, up, down
LAYER_SHAPES = [
    (HIDDEN, HIDDEN),
    (KV_WIDTH, HIDDEN),
    (KV_WIDTH, HIDDEN),
    (HIDDEN, HIDDEN),
    (INTERMEDIATE, HIDDEN),
    (INTERMEDIATE, HIDDEN),
    (HIDDEN, INTERMEDIATE),
]
_INNER_K_TILES = 2


def _packed(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
    return packed, torch.randn(cols // INT4_GROUP, rows, 2).to(COMPUTE_DTYPE)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls, in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,8,16,32,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    packed = [_packed(n, k) for _ in range(LAYERS) for n, k in LAYER_SHAPES]
    dense = [torch.randn(n, k).to(COMPUTE_DTYPE) for _ in range(LAYERS) for n, k in LAYER_SHAPES]
    head_pair = [_packed(VOCAB, HIDDEN) for _ in range(2)]
    head_dense = torch.randn(VOCAB, HIDDEN).to(COMPUTE_DTYPE)
    for rows in (int(r) for r in args.rows.split(",")):
        timings = _timings(rows, packed, dense, head_pair, head_dense, args.repeats)
        print(json.dumps({"rows": rows, **timings}), flush=True)


def _timings(
    rows: int,
    packed: list[tuple[torch.Tensor, torch.Tensor]],
    dense: list[torch.Tensor],
    head_pair: list[tuple[torch.Tensor, torch.Tensor]],
    head_dense: torch.Tensor,
    repeats: int,
) -> dict[str, float]:
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    x = {k: torch.randn(rows, k).to(COMPUTE_DTYPE) for k in (HIDDEN, INTERMEDIATE)}

    def layers_packed() -> None:
        for w, sz in packed:
            mm(x[_cols(sz)], w, INT4_GROUP, sz)

    def layers_dense() -> None:
        for w in dense:
            torch.nn.functional.linear(x[w.shape[1]], w)

    def head_packed() -> None:
        for w, sz in head_pair:
            mm(x[HIDDEN], w, INT4_GROUP, sz)

    def head_bf16() -> None:
        torch.nn.functional.linear(x[HIDDEN], head_dense)

    return {
        "layers_int4_ms": round(median_ms(layers_packed, repeats), 2),
        "layers_bf16_ms": round(median_ms(layers_dense, repeats), 2),
        "lm_head_int4_pair_ms": round(median_ms(head_packed, repeats), 2),
        "lm_head_bf16_ms": round(median_ms(head_bf16, repeats), 2),
    }


def _cols(scales_zeros: torch.Tensor) -> int:
    """The input width of a packed weight: its scales hold one group per INT4_GROUP columns."""
    return scales_zeros.shape[0] * INT4_GROUP


if __name__ == "__main__":
    main()
