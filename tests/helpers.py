"""Test helpers that drive the engine synchronously (no thread, no server)."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import torch

from llmc.artifacts.manifest import ModelSpec
from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, BuildResult, build
from llmc.builder.targets.base import CompileOptions
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.output_processor import RequestOutput
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence


def build_compiled(
    model: str | Path,
    out: Path,
    name: str,
    compile: CompileOptions,
    isq: str | None = None,
    cpu_kernels: bool = True,
    cpu_isa: str = "host",
) -> BuildResult:
    """`llmc build` of a local model folder or GGUF file with its decode step compiled (for the
    host's CPU capability only unless `cpu_isa` says otherwise: each more is another compile)."""
    options = BuildOptions(
        model=str(model),
        gguf_file=None,
        weights=None,
        output=out,
        name=name,
        isq=isq,
        compile=compile,
        cpu_kernels=cpu_kernels,
        cpu_isa=cpu_isa,
    )
    return build(options)


def open_engine(artifact_dir: Path, **config: object) -> Engine:
    return Engine(Artifact.open(artifact_dir), EngineConfig(**config))  # type: ignore[arg-type]


def drain_inbox(engine: Engine) -> None:
    """Do what the engine thread does with newly submitted work, in this thread."""
    while True:
        try:
            item = engine._inbox.get_nowait()
        except queue.Empty:
            return
        assert item is not None
        engine._accept(item)


def generate(
    engine: Engine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    collect: list[RequestOutput] | None = None,
) -> list[list[int]]:
    """Run prompts to completion by stepping the engine in this thread; return generated ids."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    results: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    done: set[str] = set()

    def sink(out: RequestOutput) -> None:
        results[out.request_id].extend(out.token_ids)
        if collect is not None:
            collect.append(out)
        if out.finished:
            done.add(out.request_id)

    for i, (ids, p) in enumerate(zip(prompts, per_prompt, strict=True)):
        engine.submit(f"r{i}", ids, p, sink)
    while len(done) < len(prompts):
        drain_inbox(engine)
        engine.step()
    return [results[f"r{i}"] for i in range(len(prompts))]


def prompt_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position, computed through the paged KV cache (float32; the runner's
    numpy array as a tensor, for comparisons with torch references)."""
    seq = Sequence("logits", ids, SamplingParams(max_tokens=1))
    engine.block_manager.allocate(seq)
    try:
        return torch.from_numpy(engine.runner.run([(seq, len(ids))], all_logits=True)[1])
    finally:
        engine.block_manager.free(seq)


def grammar_accepts(compiler: tuple[Any, Any], grammar: str, text: str) -> bool:
    """Whether the grammar lets `text` be generated, token by token, through the engine's interface
    (`compiler`: the grammar_compiler fixture)."""
    grammars, tokenizer = compiler
    constraint = grammars.constraint(grammar)
    for token in tokenizer.encode(text).ids:
        if not bool(constraint.allowed()[token]):
            return False
        constraint.accept(token)
    return True


# SmolLM2-135M's shapes, for tests that plan without building.
SMOLLM2_SPEC = ModelSpec(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def smollm2_tensor_shapes() -> dict[str, list[int]]:
    """SmolLM2-135M's tensors by name, their shapes (no weights)."""
    shapes = {"model.embed_tokens.weight": [49152, 576], "model.norm.weight": [576]}
    for i in range(30):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": [576, 576],
            p + "self_attn.k_proj.weight": [192, 576],
            p + "self_attn.v_proj.weight": [192, 576],
            p + "self_attn.o_proj.weight": [576, 576],
            p + "mlp.gate_proj.weight": [1536, 576],
            p + "mlp.up_proj.weight": [1536, 576],
            p + "mlp.down_proj.weight": [576, 1536],
            p + "input_layernorm.weight": [576],
        }
    return shapes
