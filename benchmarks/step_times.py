"""Time of one compiled decode step, per batch size and context length, for each artifact.

    python -m llmc.benchmarks.step_times out/smollm2 out/smollm2-q4k

Calls the package the engine would pick for the batch (kernels/cpu/qmatmul_cpu.py's weight forms)
with synthetic inputs: every sequence at the same context length, its blocks laid out one after
another. No HTTP, scheduling or sampling, so two builds of the same model compare on the step
alone. The artifacts are measured in turns, and each figure is the best of those turns' medians,
which keeps a noisy shared machine from favouring whichever ran first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llmc.artifacts.reader import Artifact
from llmc.benchmarks.weight_forms import median_ms
from llmc.runtime.engine import Engine, EngineConfig

REPEATS = 15  # timed calls per case and turn, after one warm-up call
TURNS = 3  # rounds over the artifacts


def step_ms(engine: Engine, batch: int, context: int) -> float:
    runner = engine.runner
    block_size = runner.block_size
    blocks = -(-context // block_size)
    tables = torch.arange(batch * blocks, dtype=torch.int64).view(batch, blocks)
    lengths = torch.full((batch,), context, dtype=torch.int64)
    slots = tables[:, (context - 1) // block_size] * block_size + (context - 1) % block_size
    ids = torch.full((batch,), 100, dtype=torch.int64)  # any token: the time does not depend on it
    positions = torch.full((batch,), context - 1, dtype=torch.int64)
    compiled = runner._compiled_for(batch, context)
    if compiled is None:
        raise SystemExit(f"no compiled step covers batch {batch} at context {context}")

    def call() -> None:
        compiled(ids, positions, slots, tables, lengths, runner._kv_flat, runner._pad_slot)

    return median_ms(call, REPEATS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--cases", default="1x64,1x256,4x256,16x256,32x256", help="BATCHxCONTEXT, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines = [Engine(Artifact.open(path, verify=False), EngineConfig()) for path in args.artifacts]
    for case in args.cases.split(","):
        batch, context = (int(part) for part in case.split("x"))
        best = [float("inf")] * len(engines)
        for _ in range(TURNS):
            for i, engine in enumerate(engines):
                best[i] = min(best[i], step_ms(engine, batch, context))
        row = {"batch": batch, "context": context}
        row.update({str(path): round(ms, 2) for path, ms in zip(args.artifacts, best, strict=True)})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
