"""How fast this machine's threads read memory: the ceiling for a decode step whose weights do not
fit the caches (a step must read every weight once per token).

    python -m llmc.benchmarks.memory_bandwidth --threads 2

Reads a float32 buffer much larger than any cache with torch's reductions (sum and max, which
stream the buffer once, split among the threads) and reports GB/s, best and median of the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

BUFFER_BYTES = 2 << 30  # far above any CPU's last-level cache
RUNS = 5


def measure(threads: int, buffer_bytes: int = BUFFER_BYTES, runs: int = RUNS) -> dict[str, float]:
    torch.set_num_threads(threads)
    x = torch.ones(buffer_bytes // 4, dtype=torch.float32)  # written once: every page is resident
    result: dict[str, float] = {"threads": threads, "buffer_gib": buffer_bytes / 2**30}
    for name, read in (("sum", x.sum), ("max", x.max)):
        read()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            read()
            times.append(time.perf_counter() - started)
        times.sort()
        result[f"{name}_best_gb_s"] = round(buffer_bytes / times[0] / 1e9, 1)
        result[f"{name}_median_gb_s"] = round(buffer_bytes / times[len(times) // 2] / 1e9, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(json.dumps(measure(args.threads)))


if __name__ == "__main__":
    main()
