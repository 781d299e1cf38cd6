"""How near single-stream decode is to reading its weights once, beside llama-server at the same
moments: whether a decode ratio against llama.cpp is left on the table or is the memory's.

    python -m llmc.benchmarks.decode_ceiling ARTIFACT --gguf FILE.gguf \\
        --llama-server .cache/llama.cpp/build/bin/llama-server [--turns 6]

Per turn, in this order: llama-server's decode of DECODE_TOKENS tokens (its own `timings`), then
in this process the artifact's compiled decode step at batch 1, the same quantized matmuls called
back to back on their prepared forms, and a plain read (a torch sum) of those forms' bytes, then
llama-server again; the peer's figure is the mean of the two around llmc's. A step that reads
every weight once cannot beat the plain read of its bytes, so `ratio_at_read_rate` (the plain
read's tokens per second over llama-server's) bounds what any kernel work can reach against this
peer at that moment. Both engines are measured in turns because the machines these run on are
shared VMs whose memory rate moves within minutes. The artifact should be built from the same
GGUF (`llmc build --m FILE.gguf`), so that both read the same blocks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import torch

from llmc.artifacts.reader import Artifact
from llmc.benchmarks.ready import free_port, wait_healthy
from llmc.benchmarks.step_times import step_ms
from llmc.benchmarks.weight_forms import median_ms
from llmc.kernels.cpu import qmatmul_vnni
from llmc.kernels.cpu.qmatmul_cpu import CpuQMatmul
from llmc.runtime.engine import Engine, EngineConfig

DECODE_TOKENS = 64  # llama-server tokens per measure: seconds at 3B, enough for a steady rate
PEER_CONTEXT = 512  # llama-server's context: the prompt and DECODE_TOKENS fit
STEP_CONTEXT = 64  # llmc's step at this context, about where llama-server's decode runs
REPEATS = 9  # timed calls per llmc measure and turn, after a warm-up call
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
# Long enough for one llama-server request of DECODE_TOKENS at 3B on two busy cores.
REQUEST_LIMIT_S = 300


def llama_decode_tok_s(base: str) -> float:
    """llama-server's decode rate for one request, as its `timings` report it (sampling included)."""
    body = {"prompt": PROMPT, "n_predict": DECODE_TOKENS, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    response = httpx.post(f"{base}/completion", json=body, timeout=REQUEST_LIMIT_S)
    response.raise_for_status()
    return float(response.json()["timings"]["predicted_per_second"])


def kernel_matmuls(engine: Engine) -> list[CpuQMatmul]:
    """The model's weights held in the kernel's forms, in the order the step calls them."""
    mods = [m for m in engine.runner.model.modules() if isinstance(m, CpuQMatmul) and m.kernel_weight is not None]
    if not mods:
        raise SystemExit("no weight of this artifact is in the CPU kernel's forms on this host")
    return mods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF llama-server decodes (the source)")
    parser.add_argument("--llama-server", type=Path, default=Path(".cache/llama.cpp/build/bin/llama-server"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    llama_cmd = [str(args.llama_server), "-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(port),
                 "-t", str(args.threads), "-c", str(PEER_CONTEXT), "-np", "1"]  # fmt: skip
    started = time.perf_counter()
    server = subprocess.Popen(llama_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        engine = Engine(Artifact.open(args.artifact, verify=False), EngineConfig(threads=args.threads))
        mods = kernel_matmuls(engine)
        inputs = [torch.randn(1, m.in_features) for m in mods]
        forms = [(m.kernel_weight, m.kernel_scales, m.kernel_bits) for m in mods]
        form_bytes = sum(w.numel() * w.element_size() + s.numel() * s.element_size() for w, s, _ in forms)
        # Plain reads as int64 words where the bytes allow (a byte-wise sum is compute-bound).
        words = [w.view(-1).view(torch.int64) if w.numel() % 8 == 0 else w.view(-1) for w, _, _ in forms]

        def matmuls() -> None:
            for (weight, scales, bits), x in zip(forms, inputs, strict=True):
                qmatmul_vnni.qmatmul(x, weight, scales, bits)

        def reads() -> None:
            for word in words:
                word.sum()

        wait_healthy(server, base, started, "llama-server")
        llama_decode_tok_s(base)  # warm-up
        print(json.dumps({"forms_gb": round(form_bytes / 1e9, 3), "matmuls": len(mods)}), flush=True)
        rows = []
        for _ in range(args.turns):
            before = llama_decode_tok_s(base)
            step = step_ms(engine, 1, STEP_CONTEXT)
            alone = median_ms(matmuls, REPEATS)
            read = median_ms(reads, REPEATS)
            after = llama_decode_tok_s(base)
            peer = (before + after) / 2
            row = {
                "llama_tok_s": round(peer, 1),
                "step_ms": round(step, 1),
                "step_tok_s": round(1e3 / step, 1),
                "ratio": round(1e3 / step / peer, 2),
                "matmuls_ms": round(alone, 1),
                "read_ms": round(read, 1),
                "read_gb_s": round(form_bytes / read / 1e6, 1),
                "step_share_of_read_rate": round(read / step, 2),
                "ratio_at_read_rate": round(1e3 / read / peer, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        summary = {key: statistics.median(float(r[key]) for r in rows) for key in rows[0]}
        print(json.dumps({"median": summary}))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
