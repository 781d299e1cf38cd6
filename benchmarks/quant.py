"""In-situ quantization beside llama.cpp, on SmolLM2's weights, in one run:

1. quality: every format's relative RMSE, ours vs llama.cpp's quantizer (ggml_quantize_chunk, the
   function llama_model_quantize calls), on every f32 weight whose rows fit the format's blocks;
2. perplexity of f32 / q8_0 / q4k on a fixed text, ours vs llama.cpp's f32 / Q8_0 / Q4_K_M;
3. single-stream decode tok/s at q4k and q8_0, ours (`llmc run`, streamed over HTTP) vs llama.cpp
   (llama-cpp-python in process) at Q4_K_M and Q8_0, same prompt and threads.

    python -m llmc.benchmarks.quant --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --json-out bench-quant.json

The f32 reference is the source GGUF dequantized (the only SmolLM2 weights on this machine); both
quantizers start from it. Needs the bench extra (make install-bench).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmc.artifacts.reader import Artifact
from llmc.benchmarks.e2e import bench_llama_cpp, bench_llmc_server
from llmc.quant.formats import FORMATS
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence

# llama.cpp's file types for each of our formats (llama.h's LLAMA_FTYPE_MOSTLY_*); the K-quants
# use the _M mixes, which our quant_plan mirrors.
LLAMA_FTYPES = {
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q2k": 10,
    "q3k": 12,
    "q4k": 15,
    "q5k": 17,
    "q6k": 18,
}
PERPLEXITY_FORMATS = ("none", "q8_0", "q4k")  # none: the f32 reference
DECODE_FORMATS = ("q4k", "q8_0")
# Written for this benchmark; any fixed English text of a few hundred tokens serves.
TEXT = (
    "The printing press changed how ideas travelled. Before it, a book was copied by hand, and a "
    "single copy could take a scribe months of careful work. Errors crept in with every copy, and "
    "only wealthy institutions could afford a library. When movable type arrived in Europe in the "
    "fifteenth century, a workshop could produce hundreds of identical pages in a day. Prices fell, "
    "literacy rose, and pamphlets carried arguments across borders faster than any messenger. "
    "Scholars could cite the same page of the same edition, which made it easier to check a claim "
    "and to build on the work of others. Printers became publishers, editors and booksellers, and "
    "their shops turned into meeting places for writers and readers. Governments and churches soon "
    "noticed the power of the press and tried to license and censor it, with mixed success. Over "
    "the following centuries, newspapers, scientific journals and cheap novels each grew out of the "
    "same basic machine: a frame of metal letters, a layer of ink, and a sheet of paper pressed "
    "against them. Steam power, rotary presses and eventually digital typesetting made printing "
    "faster still, but the central idea stayed the same. A text that can be copied exactly and "
    "cheaply can reach people its author will never meet, and that reach has shaped science, "
    "politics and everyday life ever since."
)


def _run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llmc", *args], check=True, stdout=subprocess.DEVNULL)


def _rel_rmse(reference: np.ndarray, approx: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    return float(np.linalg.norm(ref - approx.astype(np.float64)) / max(np.linalg.norm(ref), 1e-30))


def llama_quantize(src: Path, dst: Path, fmt: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[fmt]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({fmt}) failed with {status}")


def _ggml_quantizer() -> Callable[[str, np.ndarray], np.ndarray]:
    """llama.cpp's own quantizer (ggml_quantize_chunk, from the libggml that llama-cpp-python ships)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]

    def quantize(fmt: str, rows: np.ndarray) -> np.ndarray:
        info = FORMATS[fmt]
        src = np.ascontiguousarray(rows, dtype=np.float32)
        out = np.zeros((src.shape[0], info.row_bytes(src.shape[1])), dtype=np.uint8)
        lib.ggml_quantize_chunk(info.ggml_type, src.ctypes.data, out.ctypes.data, 0, src.shape[0], src.shape[1], None)
        return out

    return quantize


def quality(reference_gguf: Path) -> list[dict[str, Any]]:
    """Per format, over every 2-D weight of the model whose rows fit the format's blocks: mean
    relative RMSE of our quantizer and of llama.cpp's on the same tensor, and how many tensors
    came out byte-identical."""
    import gguf

    theirs_quantize = _ggml_quantizer()
    tensors = [t for t in gguf.GGUFReader(str(reference_gguf)).tensors if len(t.shape) == 2]
    table = []
    for name, fmt in FORMATS.items():
        ours_err, theirs_err, identical = [], [], 0
        for tensor in tensors:
            ref = np.asarray(tensor.data, dtype=np.float32)
            if not fmt.fits(ref.shape[1]):
                continue
            ours = fmt.quantize(torch.from_numpy(ref.copy()))
            theirs = torch.from_numpy(theirs_quantize(name, ref))
            identical += int(torch.equal(ours, theirs))
            ours_err.append(_rel_rmse(ref, fmt.dequantize(ours).numpy()))
            theirs_err.append(_rel_rmse(ref, fmt.dequantize(theirs).numpy()))
        mean_ours, mean_theirs = float(np.mean(ours_err)), float(np.mean(theirs_err))
        table.append(
            {
                "format": name,
                "tensors": len(ours_err),
                "byte_identical": identical,
                "ours_rel_rmse": round(mean_ours, 5),
                "llama_cpp_rel_rmse": round(mean_theirs, 5),
                # Both are 0 where the reference already lies on the format's grid (q4_1: the source).
                "ratio": round(mean_ours / mean_theirs, 3) if mean_theirs > 0 else 1.0,
            }
        )
    return table


def our_perplexity(artifact: Path, ids: list[int]) -> float:
    engine = Engine(Artifact.open(artifact, verify=False), EngineConfig())
    seq = Sequence("ppl", ids, SamplingParams(max_tokens=1))
    engine.block_manager.allocate(seq)
    logits = torch.from_numpy(engine.runner.run([(seq, len(ids))], all_logits=True)[1])
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])
    return math.exp(-float(logprobs.mean()))


def llama_perplexity(gguf_path: Path, ids: list[int], threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_threads=threads, n_ctx=1024, logits_all=True, verbose=False)
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])
    return math.exp(-float(logprobs.mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "threads": args.threads,
        "model": args.gguf.name,
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        artifacts = {}
        for fmt in sorted({*PERPLEXITY_FORMATS, *DECODE_FORMATS}):
            artifacts[fmt] = tmp / f"llmc-{fmt}"
            _run("build", "--m", str(args.gguf), "--name", "bench", "--isq", fmt, "-o", str(artifacts[fmt]))
        reference = tmp / "reference-f32.gguf"
        _run("export", str(artifacts["none"]), "--gguf", str(reference))
        result["quality"] = quality(reference)
        llama_files = {fmt: tmp / f"llama-{fmt}.gguf" for fmt in ("q8_0", "q4k")}
        for fmt, path in llama_files.items():
            llama_quantize(reference, path, fmt, args.threads)

        engine = Engine(Artifact.open(artifacts["none"], verify=False), EngineConfig())
        ids = engine.tokenizer.encode(TEXT)
        del engine
        llama_for = {"none": reference, "q8_0": llama_files["q8_0"], "q4k": llama_files["q4k"]}
        result["perplexity"] = [
            {
                "format": "f32" if fmt == "none" else fmt,
                "tokens": len(ids),
                "ours": round(our_perplexity(artifacts[fmt], ids), 3),
                "llama_cpp": round(llama_perplexity(llama_for[fmt], ids, args.threads), 3),
            }
            for fmt in PERPLEXITY_FORMATS
        ]
        result["decode"] = []
        for fmt in DECODE_FORMATS:
            ours = bench_llmc_server(artifacts[fmt], args.threads, args.runs, eager=False)
            theirs = bench_llama_cpp(llama_files[fmt], args.threads, args.runs)
            result["decode"].append(
                {
                    "format": fmt,
                    "llama_cpp_file_type": {"q4k": "Q4_K_M", "q8_0": "Q8_0"}[fmt],
                    "llmc_decode_tok_s": round(ours["decode_tok_s"], 1),
                    "llama_cpp_decode_tok_s": round(theirs["decode_tok_s"], 1),
                    "ratio": round(ours["decode_tok_s"] / theirs["decode_tok_s"], 2),
                }
            )
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
