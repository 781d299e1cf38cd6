"""Engine decode throughput without HTTP: N sequences decoding together, per artifact.

    python -m llmc.benchmarks.throughput out/smollm2-f32 out/smollm2-bf16

Shows what the engine itself sustains (the serving benchmark adds HTTP, SSE and the clients,
which share the same cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmc.artifacts.reader import Artifact
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.output_processor import RequestOutput
from llmc.runtime.sampling_params import SamplingParams

MEASURED_STEPS = 20  # decode steps timed per batch size, after the prefill and one warm-up step


def _drain(engine: Engine) -> None:
    while not engine._inbox.empty():
        item = engine._inbox.get_nowait()
        assert item is not None
        engine._accept(item)


def measure(artifact: Path, batch: int) -> float:
    engine = Engine(Artifact.open(artifact, verify=False), EngineConfig())

    def sink(_: RequestOutput) -> None:
        return None

    params = SamplingParams(max_tokens=MEASURED_STEPS + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.submit(f"r{i}", engine.tokenizer.encode(f"Story number {i}: once upon a time"), params, sink)
    _drain(engine)
    engine.step()  # prefill
    engine.step()  # warm-up decode
    started = time.perf_counter()
    for _ in range(MEASURED_STEPS):
        engine.step()
    return batch * MEASURED_STEPS / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for artifact in args.artifacts:
        dtype = Artifact.open(artifact, verify=False).manifest.dtype
        for batch in [int(b) for b in args.batches.split(",")]:
            results.append(
                {"artifact": str(artifact), "dtype": dtype, "batch": batch, "tok_s": round(measure(artifact, batch), 1)}
            )
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
