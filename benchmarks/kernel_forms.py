"""llmc's quantized matmul with its weights streamed from memory, per form: the rate at which one
matmul of a 3B-scale weight (24576 x 3072, far larger than the caches) reads its bytes.

    python -m llmc.benchmarks.kernel_forms [--isa avx2] [--formats q6k,q4_1,q8_0,q4k] [--rows 1,4]

For q6k and q4k it measures both forms the kernel takes, the general one (for q6k a byte per value
and a float16 scale and offset per 16 weights, 10 bits per weight; for q4k 5 bits) and the
K-quant form (6.5625 and 4.625 bits, kernels/cpu/qmatmul_common.h); the other formats have one.
The forms alternate call by call within one process, so that both see the same machine (this
benchmark's machines are shared VMs whose memory rate moves from run to run). Prints the median
and best of REPEATS calls per form, in ms and GB/s of the form's bytes, 2 threads. A process loads
one kernel library, so without --isa each ISA this CPU runs is measured in a child process of its
own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmc.benchmarks.cpu_kernels import each_isa, load_isa
from llmc.kernels.cpu import cpu_kernels, qmatmul_vnni
from llmc.quant.synthetic import random_blocks

REPEATS = 30
# Llama-3.2-3B's q6k lm_head is 128256 x 3072; a fifth of it is ~20x this machine's L2 + L3.
ROWS_N, COLS_K = 24576, 3072
FORMATS = ("q6k", "q4_1", "q8_0", "q4k")

Form = tuple[torch.Tensor, torch.Tensor, int]


def forms(fmt: str) -> dict[str, Form]:
    blocks = random_blocks(fmt, ROWS_N, COLS_K, torch.Generator().manual_seed(0))
    bits, parts = qmatmul_vnni.parts(blocks, fmt)
    found: dict[str, Form] = {"general": (*qmatmul_vnni.pack(*parts, bits), bits)}
    if qmatmul_vnni.kquant_form_available(fmt):
        bits, weight, scales = qmatmul_vnni.pack_kquant_form(blocks, fmt)
        found[f"{fmt} form"] = (weight, scales, bits)
    return found


def bench(fmt: str, rows: int) -> list[dict[str, object]]:
    measured = forms(fmt)
    x = torch.randn(rows, COLS_K, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {name: [] for name in measured}
    for weight, scales, bits in measured.values():  # warm-up
        qmatmul_vnni.qmatmul(x, weight, scales, bits)
    for _ in range(REPEATS):
        for name, (weight, scales, bits) in measured.items():
            started = time.perf_counter()
            qmatmul_vnni.qmatmul(x, weight, scales, bits)
            times[name].append(time.perf_counter() - started)
    out = []
    for name, (weight, scales, _) in measured.items():
        nbytes = weight.numel() + scales.numel() * scales.element_size()
        median, best = statistics.median(times[name]), min(times[name])
        out.append(
            {
                "format": fmt,
                "form": name,
                "rows": rows,
                "bits_per_weight": round(nbytes * 8 / (ROWS_N * COLS_K), 4),
                "median_ms": round(median * 1e3, 3),
                "best_ms": round(best * 1e3, 3),
                "median_gb_s": round(nbytes / median / 1e9, 1),
            }
        )
    return out


def run_isa(isa: str, rows: list[int], formats: list[str]) -> list[dict[str, object]]:
    load_isa(isa)
    return [{"isa": isa, **row} for fmt in formats for m in rows for row in bench(fmt, m)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", choices=cpu_kernels.ISA_NAMES, help="only this ISA (default: each this CPU runs)")
    parser.add_argument("--rows", default="1,4", help="activation rows")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    formats = args.formats.split(",")
    if args.isa is not None:
        results = run_isa(args.isa, rows, formats)
    else:
        argv = ["--threads", str(args.threads), "--rows", args.rows, "--formats", args.formats]
        results = [row for child in each_isa("llmc.benchmarks.kernel_forms", argv) for row in child]
    for row in results:
        print(json.dumps(row))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
