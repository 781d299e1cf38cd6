"""llmc's CPU kernels (kernels/cpu/cpu_kernels.py) against the torch paths they replace.

    python -m llmc.benchmarks.cpu_kernels

- Quantized matmul: the VNNI kernel against torch's int4 kernel (one call, or the two calls of an
  int4 pair for q8_0/q5_0) on SmolLM2's projection shapes and lm_head, one activation row and four.
  Every weight is a distinct tensor, as many as fill ~30 MB, so that they do not all stay in cache.
- Decode attention over the paged KV cache: the kernel against the plain-torch path (gathered
  keys and values, then scaled_dot_product_attention), SmolLM2's heads, several batches.
Times are medians in microseconds per call, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from llmc.benchmarks.weight_forms import median_ms
from llmc.kernels.cpu import cpu_kernels
from llmc.kernels.cpu.qmatmul_cpu import CpuQMatmul
from llmc.kernels.paged_attention import decode_attention
from llmc.quant.formats import FORMATS

REPEATS = 50
WORKING_SET_BYTES = 30 << 20  # weights per case: about the size of this machine's L3 cache
# (format, N, K): SmolLM2's fused q/k/v, o, fused gate/up, down, and its tied lm_head (q8_0).
MATMULS = [("q4_1", 960, 576), ("q4_1", 576, 576), ("q4_1", 3072, 576), ("q4_1", 576, 1536), ("q8_0", 49152, 576)]
# SmolLM2's attention: 9 query heads over 3 KV heads of 64, blocks of 16 tokens.
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
ATTENTION = [(1, 64), (1, 256), (16, 256), (32, 256)]


def median_us(fn: Callable[[], object]) -> float:
    return median_ms(fn, REPEATS) * 1e3


def bench_matmul(fmt: str, n: int, k: int, rows: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    blocks = FORMATS[fmt].quantize(torch.randn(n, k, generator=gen) * 0.02)
    copies = max(1, WORKING_SET_BYTES // blocks.numel())
    ours = [CpuQMatmul(blocks.clone(), fmt, vnni=True) for _ in range(copies)]
    torch_forms = [CpuQMatmul(blocks.clone(), fmt) for _ in range(copies)]
    x = torch.randn(rows, k, generator=gen)
    t_ours = median_us(lambda: [m(x) for m in ours]) / copies
    t_torch = median_us(lambda: [m(x) for m in torch_forms]) / copies
    return {"format": fmt, "n": n, "k": k, "rows": rows, "vnni_us": round(t_ours, 1), "torch_us": round(t_torch, 1)}


def bench_attention(batch: int, context: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(1)
    blocks = 2048
    k_cache = torch.randn(blocks * BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    v_cache = torch.randn(blocks * BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    width = -(-context // BLOCK)
    tables = torch.randperm(blocks, generator=gen)[: batch * width].view(batch, width)
    lens = torch.full((batch,), context)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
    scale = HEAD_DIM**-0.5
    t_ours = median_us(lambda: decode_attention(q, k_cache, v_cache, BLOCK, tables, lens, scale, cpu_kernel=True))
    t_torch = median_us(lambda: decode_attention(q, k_cache, v_cache, BLOCK, tables, lens, scale))
    return {"batch": batch, "context": context, "kernel_us": round(t_ours, 1), "torch_us": round(t_torch, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reason = cpu_kernels.unsupported()
    if reason is not None:
        raise SystemExit(f"llmc's CPU kernels cannot run here: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        library = Path(tmp) / cpu_kernels.LIBRARY_NAME
        cpu_kernels.compile_library(library)
        reason = cpu_kernels.load(library)
        if reason is not None:
            raise SystemExit(reason)
        results = {
            "matmul": [bench_matmul(fmt, n, k, rows) for fmt, n, k in MATMULS for rows in (1, 4)],
            "attention": [bench_attention(batch, context) for batch, context in ATTENTION],
        }
    for section in results.values():
        for row in section:
            print(json.dumps(row))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
