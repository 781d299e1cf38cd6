"""Cost of constrained decoding per token: llguidance mask + token acceptance, on a real vocabulary.

    python -m llmc.benchmarks.grammar --artifact out/smollm2

Walks a valid JSON document for a schema token by token (as greedy decoding under the grammar
would), timing `allowed()` (the vocabulary mask) and `accept()` at each step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from llmc.artifacts.reader import Artifact
from llmc.runtime.structured_output import GrammarCompiler
from llmc.runtime.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "tags": ["math", "poetry"],
    "address": {"city": "London", "zip": "12345"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    artifact = Artifact.open(args.artifact, verify=False)
    tokenizer = Tokenizer.from_artifact(artifact)
    vocab = artifact.manifest.model.vocab_size
    started = time.perf_counter()
    tokenizer_json = artifact.read_verified(artifact.manifest.tokenizer.file).decode()
    compiler = GrammarCompiler(tokenizer_json, vocab, artifact.manifest.tokenizer.eos_token_ids)
    setup_s = time.perf_counter() - started
    grammar = compiler.from_json_schema(SCHEMA, param="response_format")
    tokens = tokenizer.encode(json.dumps(DOCUMENT))
    mask_us: list[float] = []
    accept_us: list[float] = []
    compile_us: list[float] = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        constraint = compiler.constraint(grammar)
        compile_us.append((time.perf_counter() - t0) * 1e6)
        for token in tokens:
            t0 = time.perf_counter()
            allowed = constraint.allowed()
            t1 = time.perf_counter()
            assert allowed[token], "the document must follow the schema token by token"
            constraint.accept(token)
            t2 = time.perf_counter()
            mask_us.append((t1 - t0) * 1e6)
            accept_us.append((t2 - t1) * 1e6)
    result = {
        "vocab_size": vocab,
        "tokens_per_document": len(tokens),
        "tokenizer_setup_s": round(setup_s, 3),
        "grammar_per_request_us": round(statistics.median(compile_us), 1),
        "mask_us_p50": round(statistics.median(mask_us), 1),
        "mask_us_p99": round(sorted(mask_us)[int(len(mask_us) * 0.99)], 1),
        "accept_us_p50": round(statistics.median(accept_us), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
