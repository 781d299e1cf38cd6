"""`llmc run` ready time and memory at ready: how long from process start until /health answers,
and the resident memory of the server's processes then (anonymous and file-backed apart), beside
the artifact's weight bytes, so "RSS at ready ≈ weights + KV cache" can be checked at any size.

    python -m llmc.benchmarks.ready ARTIFACT [--threads 2] [--mem 1024] [--no-kv-prefault]
        [--gguf FILE.gguf --llama-server .cache/llama.cpp/build/bin/llama-server]

File-backed pages are weights read in place from a mapped file; anonymous pages are what the
process made. For llmc's torch runtime that is the weights in the CPU kernel's forms (a copy
made at load, after which the file's pages are dropped), the KV cache pages touched so far
(all of them unless --no-kv-prefault) and the Python and torch heaps. With --gguf, llama-server
is measured the same way right after, on that file with a context of PEER_CONTEXT tokens, and
its KV cache's bytes (float16, computed from the file's fields) are reported beside it, so
that both servers' memory besides the KV cache can be compared.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# Long enough for a 3B artifact's first load on 2 busy cores; a server not up by then has failed.
STARTUP_LIMIT_S = 600
# /health polling interval: short against the seconds a load takes.
_POLL_S = 0.05
# llama-server's context with --gguf: small, so that its KV cache (cleared, hence resident, at
# load) is a few MB at these sizes and the rest of its memory stands out.
PEER_CONTEXT = 256
_F16_BYTES = 2


def free_port() -> int:
    """A TCP port free on the loopback now, for a server the benchmark starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (llmc run verifies in one process and serves in a child)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            todo.extend(int(c) for c in children)
    return found


def _memory_mb(pids: list[int]) -> dict[str, float]:
    keys = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}
    total = dict.fromkeys(keys.values(), 0.0)
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in keys:
                total[keys[key]] += int(line.split()[1]) / 1024
    return {k: round(v, 1) for k, v in total.items()}


def wait_healthy(proc: subprocess.Popen[bytes], base: str, started: float, what: str, poll_s: float = _POLL_S) -> float:
    """Poll `base`/health until it answers 200; the seconds since `started` (a perf_counter time).
    RuntimeError if `proc` exits first or STARTUP_LIMIT_S passes: `what` did not start."""
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=0.5).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if time.perf_counter() - started > STARTUP_LIMIT_S or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(poll_s)


def _started(cmd: list[str], port: int, what: str) -> dict[str, float]:
    """Start the server `cmd` (listening on `port`), wait for /health, measure, stop it: its ready
    time and the memory of its processes then."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = wait_healthy(proc, f"http://127.0.0.1:{port}", started, what)
        memory = _memory_mb(_tree(proc.pid))
    finally:
        proc.terminate()
        proc.wait()
    return {"ready_s": round(ready, 2), **memory}


def measure(artifact: Path, threads: int, mem_mb: int, extra: list[str]) -> dict[str, object]:
    port = free_port()
    cmd = [sys.executable, "-m", "llmc", "run", str(artifact), "--p", str(port), "--threads", str(threads)]
    cmd += ["--mem", str(mem_mb), *extra]
    measured = _started(cmd, port, "llmc run")
    weights = sum(f.stat().st_size for f in artifact.glob("*.safetensors"))
    return {"artifact": str(artifact), **measured, "weights_mb": round(weights / 2**20, 1)}


def gguf_kv_mb(gguf_path: Path, context: int) -> float:
    """llama.cpp's float16 KV cache for `context` tokens of this GGUF's model, in MB."""
    import gguf

    fields = gguf.GGUFReader(gguf_path).fields

    def field(key: str) -> int | None:
        found = fields.get(key)
        return int(found.contents()) if found is not None else None

    arch = str(fields["general.architecture"].contents())
    layers, heads = field(f"{arch}.block_count"), field(f"{arch}.attention.head_count")
    kv_heads, width = field(f"{arch}.attention.head_count_kv"), field(f"{arch}.embedding_length")
    if layers is None or heads is None or width is None:
        raise SystemExit(f"{gguf_path}: no layer, head or width count for {arch}")
    key_length = field(f"{arch}.attention.key_length") or width // heads
    value_length = field(f"{arch}.attention.value_length") or width // heads
    per_token = layers * (kv_heads or heads) * (key_length + value_length) * _F16_BYTES
    return round(per_token * context / 2**20, 1)


def measure_llama_server(server: Path, gguf_path: Path, threads: int) -> dict[str, object]:
    """llama-server's ready time and memory at ready on `gguf_path`, PEER_CONTEXT tokens, 1 slot."""
    port = free_port()
    cmd = [str(server), "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-c", str(PEER_CONTEXT), "-np", "1"]  # fmt: skip
    measured = _started(cmd, port, "llama-server")
    weights_mb = round(gguf_path.stat().st_size / 2**20, 1)
    kv_mb = gguf_kv_mb(gguf_path, PEER_CONTEXT)
    return {"llama_server": str(gguf_path), **measured, "kv_mb": kv_mb, "weights_mb": weights_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem", type=int, default=1024, help="KV cache MB (llmc run --mem)")
    parser.add_argument("--eager", action="store_true", help="llmc run --eager")
    parser.add_argument("--no-dense-weights", action="store_true", help="llmc run --no-dense-weights")
    parser.add_argument("--no-autotune", action="store_true", help="llmc run --no-autotune")
    parser.add_argument("--no-kv-prefault", action="store_true", help="llmc run --no-kv-prefault")
    parser.add_argument("--gguf", type=Path, help="also measure llama-server on this GGUF (the artifact's source)")
    parser.add_argument("--llama-server", type=Path, default=Path(".cache/llama.cpp/build/bin/llama-server"))
    args = parser.parse_args()
    extra = ["--eager"] * args.eager + ["--no-dense-weights"] * args.no_dense_weights
    extra += ["--no-autotune"] * args.no_autotune + ["--no-kv-prefault"] * args.no_kv_prefault
    print(json.dumps(measure(args.artifact, args.threads, args.mem, extra)), flush=True)
    if args.gguf is not None:
        print(json.dumps(measure_llama_server(args.llama_server, args.gguf, args.threads)))


if __name__ == "__main__":
    main()
