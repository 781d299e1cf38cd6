"""Serving benchmark: many concurrent streaming clients, `llmc run` beside llama.cpp's llama-server.

Both serve the same GGUF (llmc through an artifact built from it), one after the other, never at
once. For each concurrency level N, N clients each stream one /v1/completions request at the same
moment, each with its own prompt, temperature 0, `ignore_eos` so every request yields exactly
`--max-tokens` tokens. Per request: TTFT (request sent -> first SSE event carrying text) and
inter-token latencies (gaps between successive events carrying text). Output tokens are counted
from the `usage` both servers send at the end of a stream (`stream_options.include_usage`), falling
back to the number of text events; the JSON keeps both, and tokens/event shows whether a server
coalesced tokens into one event (then an ITL is the gap per event, not per token). Aggregate
tok/s is all output tokens of a round over the round's wall time; each concurrency level is measured
`--repeats` times and the median round reported. Every attempt at a round gets
fresh prompts, so neither server's prompt cache helps; a round disturbed by other work on the
machine is run again (see OTHER_LOAD_LIMIT_CORES). llama-server has `--parallel` slots: clients
beyond them wait in its queue, which shows in their TTFT.

    python -m llmc.benchmarks.serving --gguf SmolLM2.gguf --llama-server .cache/llama.cpp/build/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

# Seconds a server may take to load and answer /health before the benchmark gives up.
STARTUP_LIMIT_S = 180.0
# Seconds a stopped server gets to exit before it is killed.
SHUTDOWN_LIMIT_S = 30.0
# llama-server's context is split evenly among its slots; each slot needs room for one prompt
# (these prompts are about 60-100 tokens with a real tokenizer; `--prompt-room` for others, such as
# the synthetic models' byte-level one, which makes them ~270) plus the generated tokens.
PROMPT_ROOM_TOKENS = 192
# Tokens per KV block of an artifact whose build flags do not say (the engine's default).
DEFAULT_BLOCK_SIZE = 16
# Tokens of the unmeasured round that warms each server up (first-call allocations, batch shapes).
WARMUP_TOKENS = 8
# The machine may be shared, and both servers spin their threads at barriers, so anyone else's work
# slows them out of all proportion. "Other load" is the CPU time that neither the server nor this
# client used during a round, in cores. A round with more than this much is run again (up to
# ATTEMPTS times in all), each attempt after waiting (at most QUIET_WAIT_LIMIT_S) for a window of
# QUIET_WINDOW_S with less than QUIET_LOAD_CORES of other load.
OTHER_LOAD_LIMIT_CORES = 0.25
ATTEMPTS = 3
QUIET_WINDOW_S = 5.0
QUIET_LOAD_CORES = 0.1
QUIET_WAIT_LIMIT_S = 300.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Measured rounds per concurrency level. A 16-client round of 64 tokens lasts about 2 s on 2
# cores, and on a shared VM one round moves by 10 % from one run to the next; the median of
# three is the figure reported, every repeat is kept in the JSON.
REPEATS = 3

TOPICS = [
    "the printing press", "tidal energy", "the Silk Road", "honeybee colonies", "volcanic islands",
    "medieval cathedrals", "the steam engine", "coral reefs", "the Roman aqueducts", "jazz in the 1920s",
    "glaciers and climate", "the invention of paper", "deep-sea exploration", "migratory birds",
    "early computers", "the Great Library of Alexandria",
]  # fmt: skip
ANGLES = [
    "Explain how it began, who was involved, and why it mattered to ordinary people at the time.",
    "Describe the main technical ideas behind it and the problems engineers had to solve.",
    "Compare how it was understood a century ago with how scientists and historians see it today.",
    "Tell the story as a teacher would to curious students, with one vivid example along the way.",
]


def prompt_for(round_name: str, index: int) -> str:
    """A prompt of about 60-100 tokens, different for every client of every round: the round and
    client come first, so no prompt shares a prefix with an earlier one and neither server's
    prompt cache helps."""
    topic = TOPICS[index % len(TOPICS)]
    angle = ANGLES[(index // len(TOPICS)) % len(ANGLES)]
    return (
        f"Request {index + 1} of round {round_name}. You are writing a chapter of an encyclopedia for general "
        f"readers. The subject of this chapter is {topic}. {angle} Use plain language, avoid lists, "
        f"and keep every paragraph focused on {topic}. Begin the chapter now.\n\n"
    )


@dataclass
class RequestResult:
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    text_events: int = 0
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.text_events


async def stream_one(client: httpx.AsyncClient, body: dict[str, Any], timeout_s: float) -> RequestResult:
    result = RequestResult()
    sent = time.perf_counter()
    last = sent
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                if chunk.get("usage"):
                    result.usage_tokens = int(chunk["usage"]["completion_tokens"])
                    result.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - sent
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    result.text_events += 1
    except (TimeoutError, httpx.HTTPError, ValueError, KeyError) as exc:  # ValueError: bad JSON
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def run_round(
    base: str, extra: dict[str, Any], clients: int, max_tokens: int, timeout_s: float, round_name: str
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout_s) as client:
        bodies = [
            {**extra, "prompt": prompt_for(round_name, i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
             "ignore_eos": True, "stream_options": {"include_usage": True}}
            for i in range(clients)
        ]  # fmt: skip
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, body, timeout_s) for body in bodies))
        wall_s = time.perf_counter() - started
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [gap for r in ok for gap in r.itl_s]
    tokens = sum(r.output_tokens for r in ok)
    events = sum(r.text_events for r in ok)
    return {
        "clients": clients,
        "ok": len(ok),
        "errors": sorted({r.error for r in results if r.error is not None}),
        "wall_s": wall_s,
        "output_tokens": tokens,
        "tokens_per_event": tokens / events if events else None,
        "prompt_tokens": sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None}),
        "tok_per_s": tokens / wall_s,
        **{f"ttft_p{q}_s": percentile(ttfts, q) for q in (50, 99)},
        **{f"itl_p{q}_s": percentile(itls, q) for q in (50, 99)},
        "requests": [asdict(r) for r in results],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(cmd: list[str], base: str, log: Path) -> Iterator[int]:
    """Run a server in a process group of its own until the block ends; yield the group's id once
    /health answers 200. (`llmc run` serves from worker processes: the whole group is stopped.)"""
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + STARTUP_LIMIT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} not healthy after {STARTUP_LIMIT_S:.0f}s; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                        break
                time.sleep(0.5)
            yield proc.pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=SHUTDOWN_LIMIT_S)
            with contextlib.suppress(ProcessLookupError):  # workers left behind, if any
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def other_cpu_s(pgid: int) -> float:
    """CPU seconds the machine has spent busy so far, less those of one process group's live
    processes (a server and its workers) and of this process (the clients)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the fields after the command name
            if int(fields[2]) == pgid:  # pgrp
                busy -= int(fields[11]) + int(fields[12])  # utime + stime
    own = os.times()
    return busy / TICKS_PER_S - own.user - own.system


def wait_quiet(pgid: int) -> bool:
    deadline = time.monotonic() + QUIET_WAIT_LIMIT_S
    while time.monotonic() < deadline:
        before = other_cpu_s(pgid)
        time.sleep(QUIET_WINDOW_S)
        if (other_cpu_s(pgid) - before) / QUIET_WINDOW_S < QUIET_LOAD_CORES:
            return True
    return False


def measured_round(
    base: str, extra: dict[str, Any], clients: int, args: argparse.Namespace, pgid: int, repeat: int = 1
) -> dict[str, Any]:
    discarded: list[dict[str, float]] = []
    for attempt in range(1, ATTEMPTS + 1):
        quiet = wait_quiet(pgid)
        before = other_cpu_s(pgid)
        name = f"{clients}-{repeat}-{attempt}"  # a new prompt set per repeat and attempt: no prompt cache hits
        result = asyncio.run(run_round(base, extra, clients, args.max_tokens, args.request_timeout, name))
        result["other_load_cores"] = (other_cpu_s(pgid) - before) / result["wall_s"]
        result.update(attempt=attempt, quiet_before=quiet, discarded_attempts=discarded)
        if result["other_load_cores"] <= OTHER_LOAD_LIMIT_CORES:
            break
        discarded.append({"tok_per_s": result["tok_per_s"], "other_load_cores": result["other_load_cores"]})
        print(f"  other load {result['other_load_cores']:.2f} cores during the round", file=sys.stderr, flush=True)
    return result


def bench_server(
    name: str, cmd: list[str], port: int, extra: dict[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    base = f"http://127.0.0.1:{port}"
    rounds = []
    with serving(cmd, base, Path(tempfile.gettempdir()) / f"bench-serving-{name}.log") as pgid:
        warm_clients = min(args.clients)
        warm = asyncio.run(run_round(base, extra, warm_clients, WARMUP_TOKENS, args.request_timeout, "warm-up"))
        if warm["errors"]:
            raise RuntimeError(f"{name} warm-up failed: {warm['errors']}")
        for clients in args.clients:
            print(f"{name}: {clients} clients ...", file=sys.stderr, flush=True)
            repeats = [measured_round(base, extra, clients, args, pgid, r) for r in range(1, args.repeats + 1)]
            rounds.append({"server": name, **median_round(repeats), "preemptions_so_far": preemptions(base)})
    return rounds


def preemptions(base: str) -> int | None:
    """Requests llmc's engine has preempted (and recomputed) since it started, from its /metrics;
    None for a server without that counter. A preempted request's prompt is computed again, so a
    round with preemptions measures a KV cache too small for it, not the engine's speed."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        for line in httpx.get(f"{base}/metrics", timeout=5.0).text.splitlines():
            if line.startswith("llmc_num_preemptions "):
                return int(float(line.split()[1]))
    return None


def median_round(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose tok/s is the median of the repeats (the lower middle one of an even
    count), with every repeat's headline figures beside it."""
    ordered = sorted(repeats, key=lambda r: r["tok_per_s"])
    keep = ("tok_per_s", "ttft_p50_s", "itl_p50_s", "other_load_cores", "attempt")
    return {**ordered[(len(ordered) - 1) // 2], "repeats": [{k: r[k] for k in keep} for r in repeats]}


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "loadavg_at_end": os.getloadavg()}  # fmt: skip


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def table(rounds: list[dict[str, Any]]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    lines = [
        "| server | clients | ok | aggregate tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) "
        "| other load (cores) | every repeat's tok/s | preemptions so far |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rounds:
        repeats = " / ".join(f"{x['tok_per_s']:.0f}" for x in r.get("repeats", [r]))
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['ok']}/{r['clients']} | {r['tok_per_s']:.1f} "
            f"| {ms(r['ttft_p50_s'])} | {ms(r['ttft_p99_s'])} | {ms(r['itl_p50_s'])} | {ms(r['itl_p99_s'])} "
            f"| {max(0.0, r['other_load_cores']):.2f} | {repeats} | {_count(r.get('preemptions_so_far'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, default=Path("out/smollm2"))
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF llama-server loads (the artifact's source)")
    parser.add_argument("--llama-server", type=Path, default=Path(".cache/llama.cpp/build/bin/llama-server"))
    parser.add_argument("--clients", type=lambda s: [int(n) for n in s.split(",")], default=[16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="model threads, for both servers")
    parser.add_argument("--parallel", type=int, default=16, help="llama-server's slots (-np)")
    parser.add_argument(
        "--prompt-room", type=int, default=PROMPT_ROOM_TOKENS, help="llama-server's context per slot for the prompt"
    )
    parser.add_argument(
        "--repeats", type=int, default=REPEATS, help="measured rounds per concurrency level; the median one is reported"
    )
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    if not (args.artifact / "manifest.json").exists():
        subprocess.run(["make", "build-default", f"ARTIFACT={args.artifact}"], check=True)
    inspect = json.loads(
        subprocess.check_output([sys.executable, "-m", "llmc", "inspect", str(args.artifact), "--json"])
    )
    model_name = inspect["model_name"]
    block_size = int((inspect["build"]["flags"].get("compile") or {}).get("block_size") or DEFAULT_BLOCK_SIZE)

    # Other work on the machine skews every number here: the load averages go into the report.
    load_at_start = os.getloadavg()
    started = time.perf_counter()
    # Both servers hold the same number of tokens in their KV caches: llama-server's context
    # (room for every slot's prompt and output), so neither preempts a request the other keeps.
    ctx = args.parallel * (args.prompt_room + args.max_tokens)
    port = free_port()
    llmc_cmd = [sys.executable, "-m", "llmc", "run", str(args.artifact), "--p", str(port)]
    llmc_cmd += ["--threads", str(args.threads), "--kv-blocks", str(-(-ctx // block_size))]
    rounds = bench_server("llmc", llmc_cmd, port, {"model": model_name}, args)

    port = free_port()
    llama_cmd = [str(args.llama_server), "-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(port),
                 "-np", str(args.parallel), "-c", str(ctx), "-t", str(args.threads), "--cont-batching"]  # fmt: skip
    rounds += bench_server("llama-server", llama_cmd, port, {"model": args.gguf.name}, args)
    wall_s = time.perf_counter() - started

    print(table(rounds))
    print(f"\nwall time {wall_s:.0f} s; load average at start {load_at_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    if args.json_out:
        report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "wall_s": wall_s,
                  "loadavg_at_start": load_at_start,
                  "commands": {"llmc": llmc_cmd, "llama-server": llama_cmd}, "rounds": rounds}  # fmt: skip
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
