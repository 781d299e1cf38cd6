"""Why `llmc run` runs the model on the process's main thread: one layer's matmuls timed on the main
thread and on a worker thread, with the same torch thread count.

    python -m llmc.benchmarks.threads

torch's OpenMP-parallel CPU kernels (oneDNN's bf16 GEMM, the packed int4 matmul) pay for every
parallel region opened from a thread other than the process's initial one; MKL's f32 GEMV at this
size stays single-threaded and does not care.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# SmolLM2's MLP up projection, one decode token.
OUT_FEATURES, IN_FEATURES = 1536, 576
GROUP = 32
CALLS = 2000  # per measurement, after WARMUP calls
WARMUP = 50


def _kernels() -> dict[str, Callable[[], torch.Tensor]]:
    weight = torch.randn(OUT_FEATURES, IN_FEATURES)
    x = torch.randn(1, IN_FEATURES)
    w16, x16 = weight.bfloat16(), x.bfloat16()
    values = torch.randint(0, 16, (OUT_FEATURES, IN_FEATURES), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
    scales = torch.randn(IN_FEATURES // GROUP, OUT_FEATURES, 2).bfloat16()
    return {
        "f32 linear": lambda: F.linear(x, weight),
        "bf16 linear": lambda: F.linear(x16, w16),
        "int4 packed": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed, GROUP, scales),
    }


def _time(fn: Callable[[], torch.Tensor]) -> float:
    for _ in range(WARMUP):
        fn()
    started = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - started) / CALLS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = _kernels()
    results: dict[str, dict[str, float]] = {}

    def measure(where: str) -> None:
        results[where] = {name: round(_time(fn), 1) for name, fn in kernels.items()}

    worker = threading.Thread(target=measure, args=("worker thread (us)",))
    worker.start()  # first, so the worker thread is the first to open parallel regions
    worker.join()
    measure("main thread (us)")
    print(json.dumps({"threads": args.threads, **results}, indent=2))


if __name__ == "__main__":
    main()
