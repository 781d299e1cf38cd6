"""llmc's CPU kernels (kernels/cpu/cpu_kernels.py), per ISA, against the torch paths they replace.

    python -m llmc.benchmarks.cpu_kernels [--isa avx2] [--rows 1,4,16,64]

- Quantized matmul: llmc's kernel against torch's path for the format (the int4 kernel, the two
  calls of an int4 pair for q8_0, or bf16 dense where neither applies) on SmolLM2's shapes
  (576x576, 1536x576, 576x1536 and the 49152x576 lm_head), q4_1, q4k (only where K is a
  multiple of its 256-wide blocks) and q8_0, several activation rows. Every weight is a distinct
  tensor, as many as fill ~30 MB, so that they do not all stay in cache.
- Decode attention over the paged KV cache: the kernel against the plain-torch path (gathered
  keys and values, then scaled_dot_product_attention), SmolLM2's heads, several batches.
A process loads one kernel library, so without --isa each ISA this CPU runs is measured in a child
process of its own. Times are the best of REPEATS calls (other processes share the cores: the
minimum is the least disturbed), in microseconds per call, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmc.kernels.cpu import cpu_kernels
from llmc.kernels.cpu.qmatmul_cpu import CpuQMatmul
from llmc.kernels.paged_attention import decode_attention
from llmc.quant.formats import FORMATS

REPEATS = 20
WORKING_SET_BYTES = 30 << 20  # weights per case: about the size of this machine's L3 cache
# (N, K): SmolLM2's o (and q), gate/up, down and its tied lm_head.
SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]
MATMUL_FORMATS = ("q4_1", "q4k", "q8_0")
# SmolLM2's attention: 9 query heads over 3 KV heads of 64, blocks of 16 tokens.
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
ATTENTION = [(1, 64), (1, 256), (16, 256), (32, 256)]


def best_us(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """The fastest of `repeats` calls after one warm-up, in microseconds."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1e6


def bench_matmul(fmt: str, n: int, k: int, rows: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    blocks = FORMATS[fmt].quantize(torch.randn(n, k, generator=gen) * 0.02)
    copies = max(1, WORKING_SET_BYTES // blocks.numel())
    ours = [CpuQMatmul(blocks.clone(), fmt, cpu_kernels=True) for _ in range(copies)]
    torch_forms = [CpuQMatmul(blocks.clone(), fmt) for _ in range(copies)]
    x = torch.randn(rows, k, generator=gen)
    t_ours = best_us(lambda: [m(x) for m in ours]) / copies
    t_torch = best_us(lambda: [m(x) for m in torch_forms]) / copies
    return {"format": fmt, "n": n, "k": k, "rows": rows, "kernel_us": round(t_ours, 1), "torch_us": round(t_torch, 1)}


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
    t_ours = best_us(lambda: decode_attention(q, k_cache, v_cache, BLOCK, tables, lens, scale, cpu_kernel=True))
    t_torch = best_us(lambda: decode_attention(q, k_cache, v_cache, BLOCK, tables, lens, scale))
    return {"batch": batch, "context": context, "kernel_us": round(t_ours, 1), "torch_us": round(t_torch, 1)}


def load_isa(isa: str) -> None:
    """The kernels compiled for `isa`, loaded into this process (one library per process)."""
    with tempfile.TemporaryDirectory() as tmp:
        library = Path(tmp) / cpu_kernels.library_name(isa)
        cpu_kernels.compile_library(library, isa)
        reason = cpu_kernels.load(library, isa)
        if reason is not None:
            raise SystemExit(reason)


def each_isa(module: str, argv: list[str]) -> list[Any]:
    """The JSON results of `python -m module --isa ISA argv` for each ISA this CPU runs, each in a
    child process of its own (a process loads one kernel library)."""
    isas = cpu_kernels.host_isas()
    if not isas:
        raise SystemExit(f"llmc's CPU kernels cannot run here: {cpu_kernels.unsupported()}")
    results = []
    for isa in isas:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "results.json"
            command = [sys.executable, "-m", module, "--isa", isa, "--json-out", str(out), *argv]
            subprocess.run(command, check=True, env=os.environ, stdout=subprocess.DEVNULL)
            results.append(json.loads(out.read_text()))
    return results


def run_isa(isa: str, rows: list[int], formats: list[str]) -> dict[str, list[dict[str, object]]]:
    """Every case with the kernels compiled for `isa`, loaded into this process."""
    load_isa(isa)
    cases = [(fmt, n, k) for fmt in formats for n, k in SHAPES if k % FORMATS[fmt].block_size == 0]
    matmul = [{"isa": isa, **bench_matmul(fmt, n, k, m)} for fmt, n, k in cases for m in rows]
    attention = [{"isa": isa, **bench_attention(batch, context)} for batch, context in ATTENTION]
    return {"matmul": matmul, "attention": attention}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", choices=cpu_kernels.ISA_NAMES, help="only this ISA (default: each this CPU runs)")
    parser.add_argument("--rows", default="1,4,16,64", help="activation rows of the matmuls")
    parser.add_argument("--formats", default=",".join(MATMUL_FORMATS))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    formats = args.formats.split(",")
    results: dict[str, list[dict[str, object]]] = {"matmul": [], "attention": []}
    if args.isa is not None:
        results = run_isa(args.isa, rows, formats)
    else:
        argv = ["--threads", str(args.threads), "--rows", args.rows, "--formats", args.formats]
        for child in each_isa("llmc.benchmarks.cpu_kernels", argv):
            for key, found in child.items():
                results[key] += found
    for section in results.values():
        for row in section:
            print(json.dumps(row))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
