"""The quantized matmul's AMX paths (kernels/cpu/qmatmul_amx.h), on matrices of 3B and SmolLM2
shapes, 2 threads, ms.

    python -m llmc.benchmarks.amx [--rows 64,512] [--rounds 2]

The int8 path: the AVX-512 library in child processes run with `LLMC_CPU_AMX=0` and `1`,
alternated (the switch is read once per process), each timing every shape; one JSON line per
shape, rows and setting, the median of REPEATS calls.

    python -m llmc.benchmarks.amx --paths [--rows 16,32,64,128,512]

The bf16 path beside the int8 one and a dense bf16 copy (F.linear), in one process, alternated
call by call: one JSON line per shape and rows, the median of PATH_REPEATS turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch

from llmc.benchmarks.cpu_kernels import load_isa
from llmc.kernels.cpu import cpu_kernels, qmatmul_vnni
from llmc.quant.synthetic import random_blocks

REPEATS = 15
PATH_REPEATS = 9
# (format, N, K): a 3B lm_head slice and gate/up, and SmolLM2's gate/up, q/k/v-sized and down matrices.
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


def paths(rows: list[int]) -> list[dict[str, object]]:
    """int8 path, bf16 path and a dense bf16 copy, per shape (3B's q4k and q6k forms, q4_1)."""
    load_isa(ISA)
    if not qmatmul_vnni.bf16_path_available():
        raise SystemExit("the bf16 path does not run here (it needs AMX-BF16 and the AVX-512 library)")
    out = []
    for fmt, n, k, kform in (("q4k", 8192, 3072, True), ("q6k", 3072, 8192, True), ("q4_1", 24576, 3072, False),
                             ("q4_1", 3072, 576, False)):  # fmt: skip
        blocks = random_blocks(fmt, n, k, torch.Generator().manual_seed(0))
        if kform:
            bits, weight, scales = qmatmul_vnni.pack_kquant_form(blocks, fmt)
        else:
            bits, parts = qmatmul_vnni.parts(blocks, fmt)
            weight, scales = qmatmul_vnni.pack(*parts, bits)
        dense = qmatmul_vnni.unpack(weight, scales, bits).to(torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            calls = {
                "int8": partial(qmatmul_vnni.qmatmul, x, weight, scales, bits),
                "bf16": partial(qmatmul_vnni.qmatmul_bf16, x, weight, scales, bits),
                "dense": partial(torch.nn.functional.linear, x.to(torch.bfloat16), dense),
            }
            times: dict[str, list[float]] = {name: [] for name in calls}
            for call in calls.values():  # warm-up
                call()
            for _ in range(PATH_REPEATS):
                for name, call in calls.items():
                    started = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - started)
            medians = {f"{name}_ms": round(statistics.median(t) * 1e3, 3) for name, t in times.items()}
            out.append({"format": fmt, "n": n, "k": k, "rows": m, **medians})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="64,512", help="activation rows")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting, alternated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", action="store_true", help="the bf16 path beside the int8 one and a dense copy")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    if args.paths:
        for line in paths(rows):
            print(json.dumps(line))
        return
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
