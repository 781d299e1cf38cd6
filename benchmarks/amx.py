"""The quantized matmul with and without its AMX path (kernels/cpu/qmatmul_amx.h), on matrices of
3B and SmolLM2 shapes: the AVX-512 library in child processes run with `LLMC_CPU_AMX=0` and `1`,
alternated (the switch is read once per process), each timing every shape.

    python -m llmc.benchmarks.amx [--rows 64,512] [--rounds 2]

Prints one JSON line per shape, rows and setting: the median of REPEATS calls, in ms, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from llmc.benchmarks.cpu_kernels import load_isa
from llmc.kernels.cpu import cpu_kernels, qmatmul_vnni
from llmc.quant.synthetic import random_blocks

REPEATS = 15
# (format, N, K): a 3B lm_head slice and gate/up, and SmolLM2's q/k/v, gate/up and down matrices.
SHAPES = [
    ("q4_1", 24576, 3072),
    ("q4k", 8192, 3072),
    ("q4_1", 3072, 576),
    ("q4_1", 1536, 576),
    ("q4_1", 576, 1536),
]
ISA = "avx512_vnni"  # the only library with the AMX path


def measure(rows: list[int]) -> list[dict[str, object]]:
    """Every shape at every row count, in this process (its library and AMX setting)."""
    load_isa(ISA)
    out = []
    for fmt, n, k in SHAPES:
        blocks = random_blocks(fmt, n, k, torch.Generator().manual_seed(0))
        bits, parts = qmatmul_vnni.parts(blocks, fmt)
        weight, scales = qmatmul_vnni.pack(*parts, bits)
        for m in rows:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            for _ in range(3):  # warm-up
                qmatmul_vnni.qmatmul(x, weight, scales, bits)
            times = []
            for _ in range(REPEATS):
                started = time.perf_counter()
                qmatmul_vnni.qmatmul(x, weight, scales, bits)
                times.append(time.perf_counter() - started)
            out.append(
                {"amx": cpu_kernels.uses_amx(), "format": fmt, "n": n, "k": k, "rows": m,
                 "median_ms": round(statistics.median(times) * 1e3, 3)}
            )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="64,512", help="activation rows")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting, alternated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(rows)))
        return
    if ISA not in cpu_kernels.host_isas():
        raise SystemExit(f"this CPU does not run the {ISA} library, the only one with the AMX path")
    command = [sys.executable, "-m", "llmc.benchmarks.amx", "--child", "--rows", args.rows]
    command += ["--threads", str(args.threads)]
    for _ in range(args.rounds):
        for setting in ("0", "1"):
            env = {**os.environ, "LLMC_CPU_AMX": setting}
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            for line in json.loads(done.stdout.strip().splitlines()[-1]):
                print(json.dumps(line))


if __name__ == "__main__":
    main()
