"""Quantizer throughput, ours vs llama.cpp's, in MB/s of f16 input, every format, one run:

    python -m llmc.benchmarks.quantize_speed [--rows 2048 --cols 8192 --threads N --repeats 3]

Same input for all: one random f16 matrix (quantizing costs the same whatever the values' source).
- native: llmc.quant.native.quantize on the f16 tensor (it widens f16 to f32 itself), N threads;
- torch: the reference codecs (FORMATS[...].quantize) on the f32 tensor, as the builder ran before;
- llama.cpp: ggml_quantize_chunk from llama-cpp-python's libggml-base.so, the function
  llama_model_quantize calls, without an importance matrix. llama_model_quantize splits a tensor's
  rows into chunks across its N threads and widens f16 to f32 first; so does this benchmark: N
  Python threads (ctypes releases the GIL), each widening its row chunk with numpy and quantizing it.
  That is llama.cpp's own work split, minus its file reading and writing, which would only add to
  its time.
Each figure is the best of --repeats runs. Every format's bytes are also checked equal across the
three. Needs the bench extra (llama-cpp-python) for the llama.cpp column.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from llmc.quant import native
from llmc.quant.formats import FORMATS

_MB = 1e6


def _ggml() -> Callable[[str, np.ndarray, int], np.ndarray] | None:
    """llama.cpp's quantizer over row chunks on `threads` threads, or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_void_p]

    def quantize(name: str, src: np.ndarray, threads: int) -> np.ndarray:
        fmt = FORMATS[name]
        rows, cols = src.shape
        out = np.empty((rows, fmt.row_bytes(cols)), dtype=np.uint8)
        step = -(-rows // threads)

        def chunk(start: int) -> None:
            part = np.ascontiguousarray(src[start : start + step], dtype=np.float32)  # f16 → f32, as llama.cpp
            dst = out[start : start + step]
            lib.ggml_quantize_chunk(fmt.ggml_type, part.ctypes.data, dst.ctypes.data, 0, part.shape[0], cols, None)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(chunk, range(0, rows, step)))
        return out

    return quantize


def _best(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--no-torch", action="store_true", help="skip the (slow) torch codecs")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w16 = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    w32 = w16.float()
    mb = w16.numel() * w16.element_size() / _MB
    ggml = _ggml()
    if native.library() is None:
        raise SystemExit("the native quantizer is unavailable here (no C++ compiler?)")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, f16 [{args.rows}, {args.cols}]")
    print(f"{'format':7} {'native':>9} {'torch':>9} {'llama.cpp':>10} {'native/llama.cpp':>17}  (MB/s of f16)")
    results = {}
    for name in args.formats.split(","):
        seconds, ours = _best(partial(native.quantize, name, w16, threads=args.threads), args.repeats)
        row: dict[str, float | bool | None] = {"native_mb_s": mb / seconds, "torch_mb_s": None, "llama_cpp_mb_s": None}
        same = True
        if not args.no_torch:
            t, ref = _best(partial(FORMATS[name].quantize, w32), 1)
            row["torch_mb_s"] = mb / t
            same &= torch.equal(ours, ref)  # type: ignore[arg-type]
        if ggml is not None:
            t, theirs = _best(partial(ggml, name, w16.numpy(), args.threads), args.repeats)
            row["llama_cpp_mb_s"] = mb / t
            same &= bool(np.array_equal(ours.numpy(), theirs))  # type: ignore[union-attr, arg-type]
        row["same_bytes"] = same
        results[name] = row

        def cell(v: float | bool | None, width: int) -> str:
            return f"{v:{width}.1f}" if isinstance(v, float) else " " * (width - 1) + "-"

        ratio = row["native_mb_s"] / row["llama_cpp_mb_s"] if row["llama_cpp_mb_s"] else None
        print(
            f"{name:7} {cell(row['native_mb_s'], 9)} {cell(row['torch_mb_s'], 9)} {cell(row['llama_cpp_mb_s'], 10)}"
            f" {cell(ratio, 16)}x  {'same bytes' if same else 'BYTES DIFFER'}",
            flush=True,
        )
    if args.json_out is not None:
        args.json_out.write_text(
            json.dumps({"threads": args.threads, "shape": [args.rows, args.cols], "formats": results})
        )


if __name__ == "__main__":
    main()
