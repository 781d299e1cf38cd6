"""End-to-end benchmark: build time, cold start, prefill and single-stream decode — llmc (its
compiled decode step and eagerly) beside llama.cpp and transformers.

All run in this one process tree on the same machine, the same GGUF and the same prompts, one
after the other (never at once: they would fight over the cores). Prints JSON for
docs/BENCHMARKS.md.

    python -m llmc.benchmarks.e2e --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmc.benchmarks.ready import free_port, wait_healthy

PROMPT = "The history of the printing press begins"
# Long enough for a stable rate, short enough to stay inside a small context.
DECODE_TOKENS = 128
# The prefill benchmark's prompt length (issue 5 names 512 tokens).
PREFILL_TOKENS = 512
# /health polling while a server starts: fine against the second or so being measured.
_HEALTH_POLL_S = 0.02
# Token ids of the prefill prompts: ordinary vocabulary entries of SmolLM2 (below its 49152),
# varied per run so that no prefix cache can help.
_PREFILL_BASE_ID = 1000


def bench_build(gguf: Path, out: Path, dtype: str, isq: str | None = None) -> dict[str, float]:
    started = time.perf_counter()
    flags = ["--isq", isq] if isq else []
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmc",
            "build",
            "--m",
            str(gguf),
            "--name",
            "bench",
            "--dtype",
            dtype,
            *flags,
            "-o",
            str(out),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"build_s": time.perf_counter() - started, "compile_s": summary["compile_seconds"] or 0.0}


def prefill_prompt(run: int) -> list[int]:
    return [_PREFILL_BASE_ID + (run * 7 + i) % 20000 for i in range(PREFILL_TOKENS)]


def stream_completion(base: str, max_tokens: int, prompt: str | list[int] = PROMPT) -> list[float]:
    """Arrival times of each streamed token (one token per SSE event while no stop string is set)."""
    times: list[float] = []
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    return times


def bench_llmc_server(artifact: Path, threads: int, runs: int, eager: bool) -> dict[str, float]:
    port = free_port()
    started = time.perf_counter()
    flags = ["--eager"] if eager else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmc", "run", str(artifact), "--p", str(port), "--threads", str(threads), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_healthy(proc, base, started, "llmc run", poll_s=_HEALTH_POLL_S)
        cold_start = stream_completion(base, 1)[0] - started  # process start → first token
        stream_completion(base, 8)  # warm-up
        rates = []
        for _ in range(runs):
            times = stream_completion(base, DECODE_TOKENS)
            rates.append((len(times) - 1) / (times[-1] - times[0]))
        prefill = []
        for run in range(runs):
            sent = time.perf_counter()
            first = stream_completion(base, 1, prefill_prompt(run))[0]
            prefill.append(PREFILL_TOKENS / (first - sent))
        return {
            "ready_s": ready,
            "cold_start_s": cold_start,
            "decode_tok_s": statistics.median(rates),
            "prefill_tok_s": statistics.median(prefill),
        }
    finally:
        proc.terminate()
        proc.wait()


def bench_llama_cpp(gguf: Path, threads: int, runs: int) -> dict[str, float]:
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=512, verbose=False)
    llm.create_completion(PROMPT, max_tokens=1, temperature=0)
    load = time.perf_counter() - started
    rates = []
    for _ in range(runs):
        times = []
        for _chunk in llm.create_completion(PROMPT, max_tokens=DECODE_TOKENS, temperature=0, stream=True):
            times.append(time.perf_counter())
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    prefill = []
    n_ctx = PREFILL_TOKENS + 16
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=n_ctx, n_batch=PREFILL_TOKENS, verbose=False)
    for run in range(runs):
        llm.reset()
        sent = time.perf_counter()
        llm.create_completion(prefill_prompt(run), max_tokens=1, temperature=0)
        prefill.append(PREFILL_TOKENS / (time.perf_counter() - sent))
    return {
        "load_to_first_token_s": load,
        "decode_tok_s": statistics.median(rates),
        "prefill_tok_s": statistics.median(prefill),
    }


_TRANSFORMERS_COLD_START = """
import time, sys
from pathlib import Path
gguf = Path(sys.argv[1])
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=1, do_sample=False)
"""


def bench_transformers_cold_start(gguf: Path) -> float:
    """A fresh Python process: import transformers, from_pretrained(gguf_file=...), first token."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _TRANSFORMERS_COLD_START, str(gguf)], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="f32")
    parser.add_argument("--isq", help="llmc build --isq (default: keep the GGUF's quantized blocks, as `make run`)")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager server (big models: half the time)")
    parser.add_argument(
        "--no-transformers", action="store_true", help="skip transformers' cold start (it dequantizes to f32 in RAM)"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "artifact"
        built = bench_build(args.gguf, artifact, args.dtype, args.isq)
        ours = bench_llmc_server(artifact, args.threads, args.runs, eager=False)
        eager = None if args.no_eager else bench_llmc_server(artifact, args.threads, args.runs, eager=True)
    peer = bench_llama_cpp(args.gguf, args.threads, args.runs)
    hf_cold = None if args.no_transformers else bench_transformers_cold_start(args.gguf)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "threads": args.threads,
        "model": args.gguf.name,
        "llmc_dtype": args.dtype,
        "llmc_isq": args.isq or "keep (the GGUF's blocks)",
        "llmc_build_s": round(built["build_s"], 2),
        "llmc_compile_s": round(built["compile_s"], 2),
        "llmc_ready_s": round(ours["ready_s"], 2),
        "llmc_cold_start_s": round(ours["cold_start_s"], 2),
        "llmc_eager_cold_start_s": eager and round(eager["cold_start_s"], 2),
        "llmc_decode_tok_s": round(ours["decode_tok_s"], 1),
        "llmc_eager_decode_tok_s": eager and round(eager["decode_tok_s"], 1),
        "llmc_prefill_tok_s": round(ours["prefill_tok_s"], 1),
        "llama_cpp_load_s": round(peer["load_to_first_token_s"], 2),
        "llama_cpp_decode_tok_s": round(peer["decode_tok_s"], 1),
        "llama_cpp_prefill_tok_s": round(peer["prefill_tok_s"], 1),
        "transformers_cold_start_s": hf_cold and round(hf_cold, 2),
        "decode_ratio": round(ours["decode_tok_s"] / peer["decode_tok_s"], 2),
        "eager_decode_ratio": eager and round(eager["decode_tok_s"] / peer["decode_tok_s"], 2),
        "prefill_ratio": round(ours["prefill_tok_s"] / peer["prefill_tok_s"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
