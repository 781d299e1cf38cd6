"""GPTQ-4bit checkpoint of SmolLM2's shape on CPU (issue 21): llmc's decode tok/s on the repacked
artifact vs llama.cpp on the same weights as a q4_0 GGUF, in one run.

The checkpoint is made here from the SmolLM2 GGUF's weights (dequantized, then round-to-nearest
GPTQ v1, symmetric, group 128, written in AutoGPTQ's layout): real weights, so both engines decode
ordinary text. Its embedding / lm_head stay unquantized in float16, as GPTQ checkpoints keep them.
llmc builds it (the repack: q4_0 blocks; the float16 table kept as it is), then `llmc export` turns
that artifact into the GGUF llama.cpp runs, so both read the same bytes. llama.cpp also runs the
same model with its tables in float32 (a second checkpoint that stores them so, exported the same
way), since its float16 matmul can be the slower of the two: the ratio is against llama.cpp's
faster configuration. llmc on that float32 checkpoint is measured too (what it did before it kept
float16 tables). With --act-order the columns of each input are shuffled into groups as GPTQ's
desc_act does, and only llmc runs (GGUF has no input permutation): the figure shows what the
run-time gather costs.

    python -m llmc.benchmarks.gptq --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf [--act-order]

(Run it from outside the repository folder, as the other benchmarks: the servers it starts are
`python -m llmc` subprocesses, and the folder's own `kernels/` would shadow a library's.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from llmc.benchmarks.e2e import bench_llama_cpp, bench_llmc_server
from llmc.builder.build import BuildOptions, build
from llmc.builder.gguf_export import export_gguf
from llmc.builder.quant_plan import runs_quantized
from llmc.builder.sources.gguf_file import GgufSource
from llmc.builder.targets.base import CompileOptions

GROUP = 128  # the group size of most GPTQ checkpoints on the hub
BITS = 4
_PER_WORD = 32 // BITS
_CENTRE = 1 << (BITS - 1)  # the symmetric zero
_LEVELS_UP = (1 << BITS) - 1 - _CENTRE  # q - 8 in -8..7: the scale maps max|w| onto 7


def _pack_rows(values: np.ndarray) -> np.ndarray:
    """AutoGPTQ's packing along the first axis: [R, C] -> int32 [R / 8, C], value j in bits 4j."""
    shifts = (np.arange(_PER_WORD, dtype=np.uint32) * BITS)[None, :, None]
    words = (values.astype(np.uint32).reshape(-1, _PER_WORD, values.shape[1]) << shifts).sum(axis=1, dtype=np.uint32)
    return words.view(np.int32)


def _pack_cols(values: np.ndarray) -> np.ndarray:
    """AutoGPTQ's qzeros packing along the second axis: [R, C] -> int32 [R, C / 8]."""
    shifts = (np.arange(_PER_WORD, dtype=np.uint32) * BITS)[None, None, :]
    words = (values.astype(np.uint32).reshape(values.shape[0], -1, _PER_WORD) << shifts).sum(axis=2, dtype=np.uint32)
    return words.view(np.int32)


def gptq_layer(w: torch.Tensor, order: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Round-to-nearest symmetric GPTQ v1 of w [N, K] (groups of GROUP columns, the last may be
    short); `order`: act-order's column order, whose i-th column falls in group i // GROUP."""
    n, k = w.shape
    perm = torch.arange(k) if order is None else order
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // GROUP).to(torch.int32)
    wp = w.float()[:, perm]
    groups = -(-k // GROUP)
    scale = torch.stack([wp[:, g * GROUP : (g + 1) * GROUP].abs().amax(dim=1) for g in range(groups)], dim=1)
    scale = (scale / _LEVELS_UP).clamp_min(torch.finfo(torch.float16).tiny).half()
    qp = (wp / scale.float().repeat_interleave(GROUP, dim=1)[:, :k]).round().clamp(-_CENTRE, _LEVELS_UP) + _CENTRE
    q = torch.empty_like(qp)
    q[:, perm] = qp
    zeros = np.full((groups, n), _CENTRE - 1, dtype=np.uint32)  # v1 stores zero - 1
    return {
        "qweight": torch.from_numpy(_pack_rows(q.t().contiguous().numpy())),
        "qzeros": torch.from_numpy(_pack_cols(zeros)),
        "scales": scale.t().contiguous(),
        "g_idx": g_idx,
    }


def make_checkpoint(gguf: Path, out: Path, act_order: bool, seed: int = 0, tables: torch.dtype = torch.float16) -> Path:
    """A GPTQ v1 checkpoint folder (config, tokenizer, model.safetensors) of the GGUF's model, its
    unquantized tensors in `tables` (float16, as GPTQ checkpoints keep them)."""
    source = GgufSource(gguf, name=gguf.name)
    out.mkdir(parents=True)
    config = dict(source.config)
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": BITS,
        "group_size": GROUP,
        "desc_act": act_order,
        "sym": True,
        "checkpoint_format": "gptq",
    }
    (out / "config.json").write_text(json.dumps(config))
    tok = source.tokenizer
    (out / "tokenizer.json").write_bytes(tok.tokenizer_json)
    tok_config = {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "add_bos_token": tok.add_bos_token}
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": tok.chat_template}))
    gen = torch.Generator().manual_seed(seed)
    orders: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in sorted(source.tensors().items()):
        w = source.load(name)
        embedding = name in ("model.embed_tokens.weight", "lm_head.weight")
        if embedding or not runs_quantized(name, meta.shape):
            tensors[name] = w.to(tables).contiguous()
            continue
        layer = name.removesuffix(".weight")
        order = None
        if act_order:  # layers reading one input share its order, as GPTQ's one Hessian gives them
            prefix, local = layer.rsplit(".", 1)
            shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
            order = orders.setdefault(f"{prefix}.{shared.get(local, local)}", torch.randperm(w.shape[1], generator=gen))
        tensors |= {f"{layer}.{k}": v for k, v in gptq_layer(w, order).items()}
    save_file(tensors, out / "model.safetensors")
    return out


def _options(checkpoint: Path, artifact: Path, dtype: str, eager: bool) -> BuildOptions:
    """`llmc build`'s defaults (the decode step compiled) unless `eager` (`--no-compile`).
    "bench": the model name e2e's client asks the server for."""
    return BuildOptions(
        model=str(checkpoint),
        gguf_file=None,
        weights=None,
        output=artifact,
        dtype=dtype,
        name="bench",
        compile=None if eager else CompileOptions(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--act-order", action="store_true", help="also measure an act-order (desc_act) checkpoint")
    parser.add_argument("--dtype", default="auto", help="llmc build --dtype: of the unquantized embedding / lm_head")
    parser.add_argument("--eager", action="store_true", help="build with --no-compile and serve eagerly")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "threads": args.threads,
        "model": f"{args.gguf.name} as GPTQ v1 4-bit sym group {GROUP} (round-to-nearest)",
        "llmc": ("eager (--no-compile)" if args.eager else "the compiled decode step (the default build)")
        + ", its CPU kernel library loaded",
        "dtype": args.dtype,
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, dict[str, float]] = {}
        for tables, dtype in (("f16", torch.float16), ("f32", torch.float32)):
            ckpt = make_checkpoint(args.gguf, Path(tmp) / f"gptq-{tables}", act_order=False, tables=dtype)
            artifact = Path(tmp) / f"artifact-{tables}"
            build(_options(ckpt, artifact, args.dtype, args.eager))
            runs[f"llmc_{tables}"] = bench_llmc_server(artifact, args.threads, args.runs, eager=args.eager)
            peer_gguf = export_gguf(artifact, Path(tmp) / f"same-weights-{tables}.q4_0.gguf")
            runs[f"llama_cpp_{tables}"] = bench_llama_cpp(peer_gguf, args.threads, args.runs)
        ours = runs["llmc_f16"]
        peer_name = max(("llama_cpp_f16", "llama_cpp_f32"), key=lambda name: runs[name]["decode_tok_s"])
        peer = runs[peer_name]
        result |= {f"{name}_decode_tok_s": round(r["decode_tok_s"], 1) for name, r in runs.items()}
        result |= {f"{name}_prefill_tok_s": round(r["prefill_tok_s"], 1) for name, r in runs.items()}
        result |= {
            "peer": f"{peer_name} (the faster llama.cpp)",
            "decode_ratio": round(ours["decode_tok_s"] / peer["decode_tok_s"], 2),
            "prefill_ratio": round(ours["prefill_tok_s"] / peer["prefill_tok_s"], 2),
        }
        if args.act_order:
            ckpt = make_checkpoint(args.gguf, Path(tmp) / "gptq-act-order", act_order=True)
            artifact = Path(tmp) / "artifact-act-order"
            build(_options(ckpt, artifact, args.dtype, args.eager))
            act = bench_llmc_server(artifact, args.threads, args.runs, eager=args.eager)
            result["llmc_act_order_decode_tok_s"] = round(act["decode_tok_s"], 1)
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
