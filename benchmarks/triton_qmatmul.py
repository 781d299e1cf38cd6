"""The Triton quantized matmuls (kernels/triton/qmatmul_triton.py) on a CUDA GPU, against the bandwidth roofline.

    python -m llmc.benchmarks.triton_qmatmul --json-out bench-triton.json
    python -m llmc.benchmarks.triton_qmatmul --dry-run     # tiny shapes on the CPU (TRITON_INTERPRET=1)

Decode is memory bound: a batch-1 matmul's floor is its weight bytes over the device's copy
bandwidth, measured here device-to-device in the same run. Reported per format and layer shape of
a Llama-3-8B (M = 1, 16 and 64 rows), then the whole 8B-shaped matmul sequence of one decode step
(32 layers of q/k/v/o/gate/up/down in one format plus a q6k head), replayed as one CUDA graph so
launch overhead does not count: its time against the roofline is the best a decode step built on
these kernels can reach before attention and sampling. Weights are random valid blocks made on the
GPU (speed does not depend on the values), packed once (`pack_weight`) as a model load would.

Per-shape times are one CUDA graph of calls on enough copies of the weight (>= 256 MB) that each
call reads its weight from HBM, not from the 60 MB L2, divided by the calls: no launch overhead,
no L2 hits. `--sweep` times the GEMV's candidate configs at M = 1 (how GEMV_CONFIGS was chosen).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from llmc.kernels.triton.qmatmul_triton import (  # noqa: E402  (after TRITON_INTERPRET)
    GEMV_CONFIGS,
    GemvConfig,
    PackedWeight,
    pack_weight,
    qmatmul_packed,
)
from llmc.quant.synthetic import random_blocks  # noqa: E402

# Llama-3-8B: hidden 4096, 32 layers, 32 query / 8 KV heads of 128, FFN 14336, vocab 128256.
LLAMA3_8B_LAYER = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096)} | {
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}
LLAMA3_8B_LAYERS = 32
LLAMA3_8B_HEAD = (128256, 4096)
# Formats timed per shape: the default artifact's (q4_1, q8_0 head), the _M mixes' (q4k, q6k), q4_0, q5_0.
TIMED_FORMATS = ("q4_0", "q4_1", "q5_0", "q8_0", "q4k", "q6k")
BATCH_ROWS = (1, 16, 64)
COLD_BYTES = 256 << 20  # weight copies per per-shape timing: 4x the L2
MAX_COPIES = 64
COPY_BYTES = 1 << 30  # 1 GiB: far above the 60 MB L2, so the copy streams from HBM
WARMUP = 3
REPEATS = 20


def time_ms(fn: Any, device: torch.device, repeats: int = REPEATS) -> float:
    """Median milliseconds of `fn()` (CUDA events on a GPU, wall clock on the CPU)."""
    import statistics
    import time

    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms / 1e3)


def graph_ms(calls: list[Any], device: torch.device, repeats: int = 10) -> float:
    """Milliseconds per call of `calls` replayed as one CUDA graph (called in turn on the CPU)."""
    if device.type != "cuda":
        return time_ms(lambda: [c() for c in calls], device, repeats=3) / len(calls)
    for c in calls:  # compile before capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = time_ms(graph.replay, device, repeats=repeats)
    del graph
    return ms / len(calls)


def cold_copies(fmt: str, n: int, k: int, device: torch.device) -> list[PackedWeight]:
    """Packed copies of one random weight, enough that cycling through them misses the L2."""
    blocks = random_blocks(fmt, n, k, device=device)
    count = 1 if device.type != "cuda" else min(MAX_COPIES, max(2, -(-COLD_BYTES // blocks.numel())))
    return [pack_weight(blocks, fmt, n, k) for _ in range(count)]


def _row(fmt: str, name: str, n: int, k: int, m: int, ms: float, nbytes: int, bandwidth: float) -> dict[str, Any]:
    return {
        "format": fmt,
        "layer": name,
        "n": n,
        "k": k,
        "m": m,
        "ms": round(ms, 4),
        "weight_gb_per_s": round(nbytes / (ms / 1e3) / 1e9, 1),
        "roofline_fraction": round(nbytes / (ms / 1e3) / bandwidth, 3),
    }


def per_shape(
    device: torch.device, shapes: dict[str, tuple[int, int]], bandwidth: float, formats: tuple[str, ...]
) -> list[dict[str, Any]]:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for fmt in formats:
        for name, (n, k) in shapes.items():
            copies = cold_copies(fmt, n, k, device)
            for m in BATCH_ROWS:
                x = torch.randn(m, k, device=device, dtype=dtype)
                ms = graph_ms([lambda w=w, x=x: qmatmul_packed(x, w) for w in copies], device)
                rows.append(_row(fmt, name, n, k, m, ms, copies[0].buffer.numel(), bandwidth))
            del copies
    return rows


SWEEP_BLOCK_N = (2, 4, 8)
SWEEP_BLOCK_C = (16, 32, 64)
SWEEP_TARGETS = (264, 1024, 4096)
SWEEP_LAYERS = ("q", "k", "gate", "down")  # the four distinct shapes


def sweep(
    device: torch.device, shapes: dict[str, tuple[int, int]], bandwidth: float, formats: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The M = 1 GEMV under each candidate config, per format and layer shape."""
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for fmt in formats:
        for name, (n, k) in shapes.items():
            if name not in SWEEP_LAYERS and device.type == "cuda":
                continue
            copies = cold_copies(fmt, n, k, device)
            x = torch.randn(1, k, device=device, dtype=dtype)
            for bn in SWEEP_BLOCK_N:
                for bc in SWEEP_BLOCK_C:
                    for target in SWEEP_TARGETS:
                        cfg = GemvConfig(block_n=bn, block_c=bc, num_warps=4, target_programs=target)
                        calls = [lambda w=w, cfg=cfg, x=x: qmatmul_packed(x, w, cfg) for w in copies]
                        ms = graph_ms(calls, device, 5)
                        r = _row(fmt, name, n, k, 1, ms, copies[0].buffer.numel(), bandwidth)
                        rows.append(r | {"block_n": bn, "block_c": bc, "target_programs": target})
            del copies
    return rows


def dense_reference(device: torch.device, bandwidth: float) -> list[dict[str, Any]]:
    """bf16 torch matmuls on a dense weight (cuBLAS): what dequantize-then-matmul costs at best."""
    rows = []
    for name, (n, k) in LLAMA3_8B_LAYER.items():
        count = min(MAX_COPIES, max(2, -(-COLD_BYTES // (n * k * 2))))
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(count)]
        for m in BATCH_ROWS:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ms = graph_ms([lambda w=w, x=x: x @ w.T for w in ws], device)
            rows.append(_row("bf16", name, n, k, m, ms, n * k * 2, bandwidth))
        del ws
    return rows


def decode_step_matmuls(device: torch.device, fmt: str, layers: int, bandwidth: float) -> dict[str, Any]:
    """All matmuls of one 8B-shaped decode step at batch 1, replayed as one CUDA graph."""
    weights = [
        pack_weight(random_blocks(fmt, n, k, device=device), fmt, n, k)
        for _ in range(layers)
        for (n, k) in LLAMA3_8B_LAYER.values()
    ]
    head = pack_weight(random_blocks("q6k", *LLAMA3_8B_HEAD, device=device), "q6k", *LLAMA3_8B_HEAD)
    total_bytes = sum(w.buffer.numel() for w in weights) + head.buffer.numel()
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    xf = torch.randn(1, 14336, device=device, dtype=torch.bfloat16)

    def step() -> None:
        for w in weights:
            qmatmul_packed(x if w.k == 4096 else xf, w)
        qmatmul_packed(x, head)

    step()  # compile every kernel variant before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    eager_ms = time_ms(step, device, repeats=5)
    graph_ms = time_ms(graph.replay, device)
    floor_ms = total_bytes / bandwidth * 1e3
    return {
        "format": fmt,
        "weight_gb": round(total_bytes / 1e9, 3),
        "eager_ms": round(eager_ms, 3),
        "graph_ms": round(graph_ms, 3),
        "roofline_ms": round(floor_ms, 3),
        "roofline_fraction": round(floor_ms / graph_ms, 3),
        "matmul_only_tok_per_s": round(1e3 / graph_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton's interpreter")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--sweep", default="", help="formats whose GEMV candidate configs to time (M = 1)")
    parser.add_argument("--formats", default=",".join(TIMED_FORMATS), help="formats of the per-shape tables")
    parser.add_argument("--decode-formats", default="q4k,q4_0", help="formats of the 8B decode-step graph")
    args = parser.parse_args()
    formats = tuple(f for f in args.formats.split(",") if f)
    if args.dry_run:
        device = torch.device("cpu")
        shapes = {"tiny": (16, 256)}
        bandwidth = copy_bandwidth(device, 1 << 24)
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or --dry-run)")
        device = torch.device("cuda")
        shapes = LLAMA3_8B_LAYER
        bandwidth = copy_bandwidth(device, COPY_BYTES)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_gb_per_s": round(bandwidth / 1e9, 1),
        "gemv_configs": {f: vars(c) for f, c in GEMV_CONFIGS.items()},
    }
    if args.sweep:
        result["sweep"] = sweep(device, shapes, bandwidth, tuple(args.sweep.split(",")))
        _print_sweep(result["sweep"])
    result["per_shape"] = per_shape(device, shapes, bandwidth, formats)
    if device.type == "cuda":
        result["dense_bf16"] = dense_reference(device, bandwidth)
        result["decode_step"] = [
            decode_step_matmuls(device, fmt, LLAMA3_8B_LAYERS, bandwidth)
            for fmt in args.decode_formats.split(",")
            if fmt
        ]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    print(
        f"{result['device']}  torch {result['torch']}  triton {result['triton']}  copy {result['copy_gb_per_s']} GB/s"
    )
    print(f"{'format':6} {'layer':5} {'n':>6} {'k':>6} {'m':>3} {'ms':>8} {'GB/s':>7} {'roof':>5}")
    for r in result["per_shape"] + result.get("dense_bf16", []):
        print(
            f"{r['format']:6} {r['layer']:5} {r['n']:6} {r['k']:6} {r['m']:3} {r['ms']:8.4f} "
            f"{r['weight_gb_per_s']:7.1f} {r['roofline_fraction']:5.2f}"
        )
    for d in result.get("decode_step", []):
        print(
            f"8B decode-step matmuls {d['format']}: {d['weight_gb']} GB, eager {d['eager_ms']} ms,"
            f" graph {d['graph_ms']} ms,"
            f" roofline {d['roofline_ms']} ms ({d['roofline_fraction']:.0%}), {d['matmul_only_tok_per_s']} tok/s"
        )


def _print_sweep(rows: list[dict[str, Any]]) -> None:
    """Per format and shape: the best config, and the share of the fixed config's time it would save."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["format"], r["layer"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    for (fmt, layer), r in best.items():
        cfg = GEMV_CONFIGS[fmt]
        fixed = next(
            (
                q
                for q in rows
                if (q["format"], q["layer"]) == (fmt, layer)
                and (q["block_n"], q["block_c"], q["target_programs"])
                == (cfg.block_n, cfg.block_c, cfg.target_programs)
            ),
            None,
        )
        print(
            f"sweep {fmt:5} {layer:5} best bn={r['block_n']} bc={r['block_c']} t={r['target_programs']}"
            f" {r['ms']:.4f} ms ({r['roofline_fraction']:.2f})  fixed {fixed['ms'] if fixed else float('nan'):.4f} ms",
            flush=True,
        )
    by_cfg: dict[tuple[int, int, int], dict[str, float]] = {}
    for r in rows:
        by_cfg.setdefault((r["block_n"], r["block_c"], r["target_programs"]), {})[r["format"] + r["layer"]] = r["ms"]
    totals = sorted((sum(v.values()), k) for k, v in by_cfg.items())
    for total, k in totals[:8]:
        print(f"sweep total over shapes bn={k[0]} bc={k[1]} t={k[2]}: {total:.4f} ms", flush=True)


if __name__ == "__main__":
    main()
