"""Time to first token for a request sharing a long prefix with an earlier one, cache on vs off.

    python -m llmc.benchmarks.prefix_cache --artifact out/smollm2

For each of a few distinct ~500-token documents, request A reads the document and asks one
question; request B, sent after A finishes, reads the same document and asks another. B's TTFT is
measured on a server with prefix caching (default) and on one started with --disable-prefix-cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from tests.server import running_server

SENTENCES = [
    "The river bends twice before it reaches the old mill.",
    "Merchants once traded wool and salt along its banks.",
    "In spring the meadows flood and herons return to the reeds.",
    "A stone bridge with seven arches crosses it near the church.",
    "Children fish for trout below the weir on summer evenings.",
]
PREFIX_TOKENS = 500  # the shared-prefix length


def _document(client: httpx.Client, seed: int) -> str:
    words: list[str] = []
    i = seed
    while True:
        words.append(f"Chapter {seed}, part {i}: {SENTENCES[i % len(SENTENCES)]}")
        text = " ".join(words)
        if client.post("/tokenize", json={"prompt": text}).json()["count"] >= PREFIX_TOKENS:
            return text
        i += 1


def _ttft(client: httpx.Client, model: str, prompt: str) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - started
    assert first is not None
    return first


def run(artifact: Path, cache: bool, documents: int) -> tuple[list[float], list[float]]:
    extra = [] if cache else ["--disable-prefix-cache"]
    with running_server(artifact, *extra) as base, httpx.Client(base_url=base, timeout=300) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        first, second = [], []
        for seed in range(documents):
            doc = _document(client, seed)
            first.append(_ttft(client, model, doc + "\nQuestion: what crosses the river?\nAnswer:"))
            second.append(_ttft(client, model, doc + "\nQuestion: who fishes below the weir?\nAnswer:"))
        return first, second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--documents", type=int, default=5)
    args = parser.parse_args()
    on_first, on_second = run(args.artifact, True, args.documents)
    off_first, off_second = run(args.artifact, False, args.documents)
    result = {
        "prefix_tokens": PREFIX_TOKENS,
        "cache_on_ttft_first_s": round(statistics.median(on_first), 4),
        "cache_on_ttft_shared_s": round(statistics.median(on_second), 4),
        "cache_off_ttft_shared_s": round(statistics.median(off_second), 4),
        "cache_off_ttft_first_s": round(statistics.median(off_first), 4),
    }
    result["speedup_shared"] = round(result["cache_off_ttft_shared_s"] / result["cache_on_ttft_shared_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
