"""Issue 7: every supported family, as a tiny random model from transformers' own config class,
goes through `llmc build` and the runtime and matches transformers: logits within 1e-4 on a
64-token prompt and the same 32-token greedy continuation, alone and batched with others.
Sliding-window and soft-capping families use a window shorter than the prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmc.builder.build import BuildOptions, build
from llmc.runtime.sampling_params import SamplingParams
from tests.conftest import CHATML_TEMPLATE, make_tokenizer_json
from tests.helpers import generate, open_engine, prompt_logits

WINDOW = 16  # shorter than the 64-token prompt, so the window really cuts
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    vocab_size=323,
    tie_word_embeddings=False,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=0,
)


def _longrope() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": (1 + torch.rand(8, generator=gen)).tolist(),
        "long_factor": (2 + 4 * torch.rand(8, generator=gen)).tolist(),
    }


FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(rope_parameters=_longrope(), original_max_position_embeddings=48)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(use_qkv_bias=True)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            num_hidden_layers=6,
            layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
        ),
    ),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=16, attention_bias=True)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True),
    ),
}


def make_family(folder: Path, family: str) -> Any:
    import transformers

    config_name, model_name, overrides = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random norms and biases, so every weight matters in the comparison
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(make_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE})
    )
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(family: str, tmp_path: Path) -> None:
    hf = make_family(tmp_path / "src", family)
    build(BuildOptions(model=str(tmp_path / "src"), gguf_file=None, weights=None, output=tmp_path / "art"))
    engine = open_engine(tmp_path / "art")
    assert engine.runner.model.spec.architecture == family
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 320, (64,), generator=gen).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    got = prompt_logits(engine, ids)
    assert (got - expected).abs().max().item() < 1e-4

    short = ids[:40]  # phi3: 40 + 32 crosses longrope's original context of 48 while decoding
    with torch.no_grad():
        hf_greedy = hf.generate(
            torch.tensor([short]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 40:].tolist()
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    assert generate(engine, [short], greedy)[0] == hf_greedy
    others = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (7, 70, 23)]
    batched = generate(engine, [others[0], short, others[1], others[2]], greedy)
    assert batched[1] == hf_greedy


def test_unsupported_family_lists_supported(tmp_path: Path) -> None:
    from llmc.builder.arch import spec_from_config
    from llmc.errors import BadModelError

    with pytest.raises(BadModelError, match="Gemma2ForCausalLM"):
        spec_from_config({"architectures": ["BertModel"]})


def test_experts_saved_one_by_one(tmp_path: Path) -> None:
    """Older MoE checkpoints store each expert's projections separately: they are stacked at build."""
    from safetensors.torch import load_file, save_file

    hf = make_family(tmp_path / "src", "qwen3_moe")
    weights_file = tmp_path / "src" / "model.safetensors"
    fused = load_file(weights_file)
    split: dict[str, torch.Tensor] = {}
    for name, tensor in fused.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.removesuffix(".gate_up_proj")
            for e, expert in enumerate(tensor):
                gate, up = expert.chunk(2)
                split[f"{base}.{e}.gate_proj.weight"], split[f"{base}.{e}.up_proj.weight"] = gate.clone(), up.clone()
        elif name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix(".down_proj")
            for e, expert in enumerate(tensor):
                split[f"{base}.{e}.down_proj.weight"] = expert.clone()
        else:
            split[name] = tensor
    save_file(split, str(weights_file), metadata={"format": "pt"})
    build(BuildOptions(model=str(tmp_path / "src"), gguf_file=None, weights=None, output=tmp_path / "art"))
    ids = torch.randint(3, 320, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert (prompt_logits(open_engine(tmp_path / "art"), ids) - expected).abs().max().item() < 1e-4
