"""Synthetic models of real shapes, made offline: Hugging Face folders (config.json, tokenizer.json,
tokenizer_config.json, sharded bf16 safetensors with an index) holding random weights in the
shapes of Llama-3.2-1B, Llama-3.2-3B or Llama-3-8B, so build memory and decode speed at those
sizes can be measured without downloading anything (neither depends on the weights' values).

    python -m llmc.benchmarks.synthetic_models --shape llama-3.2-1b -o /tmp/llama-1b
    llmc build --m /tmp/llama-1b --isq q4k --no-compile -o /tmp/llama-1b-q4k

The tokenizer is a small byte-level BPE trained on a fixed text, padded with filler tokens to the
real vocabulary size and given Llama 3's special tokens at Llama 3's ids, so token ids the model
samples always decode. Weights are written one shard at a time (the writer's memory stays at
one shard, whatever the model size).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmc.builder.gguf_tokenizer import PRE_TOKENIZERS

# The configs of the published models (their config.json), less what only transformers reads.
_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA3_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        **_LLAMA3_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_scaling": _LLAMA3_ROPE_SCALING,
        "tie_word_embeddings": True,
    },
    "llama-3.2-3b": {
        **_LLAMA3_COMMON,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_scaling": _LLAMA3_ROPE_SCALING,
        "tie_word_embeddings": True,
    },
    "llama-3-8b": {
        **_LLAMA3_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 8192,
        "eos_token_id": 128001,
        "tie_word_embeddings": False,
    },
}

# Shards are cut at this many bytes, as Hugging Face's own exports are (5 GB there; smaller here so
# that even the 1B model is sharded and the writer holds little).
SHARD_BYTES = 1024**3
# Random weights' standard deviation: Llama's initializer_range, so activations stay finite.
INIT_STD = 0.02
# Byte-level BPE merges learnt from _TEXT: enough for ordinary text to tokenize into real words.
_TRAINED_VOCAB = 2000
# Llama 3 reserves its last 256 ids for special tokens; these, by offset from the first, carry meaning.
_SPECIAL_IDS = 256
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
}
_TEXT = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Benchmarks measure how fast a model decodes tokens, not what the tokens say.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text; so do accents like café and naïve.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
] * 20
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE with exactly `vocab_size` ids: trained tokens, filler, then the 256 specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Llama 3's own pre-tokenizer (llama.cpp's "llama-bpe"), so the artifact exports to GGUF too.
    llama3_split = PRE_TOKENIZERS["llama-bpe"][0]["pattern"]["Regex"]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(llama3_split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    first_special = vocab_size - _SPECIAL_IDS
    if first_special < _TRAINED_VOCAB:
        raise ValueError(f"vocab_size must be at least {_TRAINED_VOCAB + _SPECIAL_IDS}")
    trainer = trainers.BpeTrainer(
        vocab_size=_TRAINED_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_TEXT, trainer)
    specials = [_NAMED_SPECIALS.get(i, f"<|reserved_special_token_{i}|>") for i in range(_SPECIAL_IDS)]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 0)]
    )
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # Filler tokens (one byte-level word each, never produced by a merge) up to the special ids.
    for i in range(len(vocab), first_special):
        vocab[f"<filler_{i}>"] = i
    data["model"]["vocab"] = vocab
    for added in data["added_tokens"]:
        added["id"] = first_special + specials.index(added["content"])
    data["post_processor"]["special_tokens"]["<|begin_of_text|>"]["ids"] = [first_special]
    return json.dumps(data, ensure_ascii=False)


def llama_config(shape: str, **overrides: Any) -> dict[str, Any]:
    """The config of `shape` (a key of SHAPES) with `overrides` (smaller test models), its special
    token ids kept at the same offsets within the last 256 ids of the vocabulary, as in Llama 3."""
    config = {**SHAPES[shape], **overrides}
    shift = config["vocab_size"] - SHAPES[shape]["vocab_size"]
    eos = config["eos_token_id"]
    config["bos_token_id"] += shift
    config["eos_token_id"] = [i + shift for i in eos] if isinstance(eos, list) else eos + shift
    return config


def _tensor_shapes(config: dict[str, Any]) -> dict[str, list[int]]:
    """Every tensor of a LlamaForCausalLM with this config, in HF names."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = [vocab, h]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": [q, h],
            p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h],
            p + "self_attn.o_proj.weight": [h, q],
            p + "mlp.gate_proj.weight": [inter, h],
            p + "mlp.up_proj.weight": [inter, h],
            p + "mlp.down_proj.weight": [h, inter],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        }
    return shapes


def make_model(folder: Path, config: dict[str, Any], seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a synthetic model folder (random bf16 weights, sharded with an index) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    size = 0
    names: list[list[str]] = [[]]
    shapes = _tensor_shapes(config)
    for name, shape in shapes.items():  # plan the shards first, so each is made and written alone
        nbytes = 2 * int(torch.tensor(shape).prod())
        if names[-1] and size + nbytes > shard_bytes:
            names.append([])
            size = 0
        names[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for index, group in enumerate(names):
        file = f"model-{index + 1:05d}-of-{len(names):05d}.safetensors"
        shard = {}
        for name in group:
            shape = shapes[name]
            if len(shape) == 1:
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                shard[name] = (torch.randn(shape, generator=generator) * INIT_STD).to(torch.bfloat16)
            weight_map[name] = file
            total += shard[name].nbytes
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        del shard
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    eos = config["eos_token_id"]
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "do_sample": True})
    )
    (folder / "tokenizer.json").write_text(tokenizer_json(config["vocab_size"]), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "add_bos_token": True,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True, help="whose config to copy")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder to create (must not exist)")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smaller test models)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output.exists():
        sys.exit(f"{args.output} exists; choose a new folder (this script never overwrites one)")
    config = llama_config(args.shape, **({} if args.layers is None else {"num_hidden_layers": args.layers}))
    make_model(args.output, config, args.seed)
    params = sum(int(torch.tensor(s).prod()) for s in _tensor_shapes(config).values())
    print(json.dumps({"output": str(args.output), "shape": args.shape, "parameters": params}))


if __name__ == "__main__":
    main()
