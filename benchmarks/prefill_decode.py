"""Prefill and single-stream decode of one artifact through the engine, without HTTP.

    python -m llmc.benchmarks.prefill_decode out/smollm2 --turns 6

Runs the llmc of this process: to compare two versions of llmc, run it from each one's
environment in turns (alternated: the shared machine's load moves single figures by a fifth). Each
turn prefills a prompt of its own (none is in the prefix cache) and decodes greedily from a short
one; the first greedy tokens are printed so that two versions can be checked to agree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmc.artifacts.reader import Artifact
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.sampling_params import SamplingParams
from llmc.tests.helpers import generate

PROMPT_TOKENS = 512  # the prefill measured: a long chat prompt
DECODE_TOKENS = 128  # greedy tokens per decode turn
KV_BLOCKS = 256  # room for one prompt and its continuation at any block size up to 64
FIRST_TOKENS = 20  # printed, to check that two versions generate the same text
# Token ids spread over the vocabulary of any model with at least VOCAB_FLOOR ids.
VOCAB_FLOOR = 32000


def _prompt(turn: int) -> list[int]:
    return [(7 * i + 131 * turn) % (VOCAB_FLOOR - 100) + 100 for i in range(PROMPT_TOKENS)]


def measure(artifact: Path, turns: int) -> dict[str, object]:
    engine = Engine(Artifact.open(artifact), EngineConfig(kv_blocks=KV_BLOCKS))
    decode = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    generate(engine, [_prompt(0)[:16]], decode)  # warm-up: first calls, page faults
    prefill, rates, tokens = [], [], []
    for turn in range(1, turns + 1):
        started = time.perf_counter()
        generate(engine, [_prompt(turn)], first)
        prefill.append(round(time.perf_counter() - started, 4))
        started = time.perf_counter()
        tokens = generate(engine, [_prompt(0)[:8]], decode)[0]
        rates.append(round(len(tokens) / (time.perf_counter() - started), 1))
    return {
        "artifact": str(artifact),
        "prefill_s": prefill,
        "decode_tok_s": rates,
        "best_prefill_tok_s": round(PROMPT_TOKENS / min(prefill), 1),
        "best_decode_tok_s": max(rates),
        "first_tokens": tokens[:FIRST_TOKENS],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    print(json.dumps(measure(args.artifact, args.turns)))


if __name__ == "__main__":
    main()
