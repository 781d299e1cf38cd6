"""Which tensors `--isq FORMAT` quantizes, and to what: the one rule, recorded per tensor.

Only the 2-D projection weights of attention and MLP blocks (and an untied lm_head) are
quantized. Embeddings, norms, biases, MoE routers and stacked expert tensors keep the build's
dtype: they are small or precision-critical, and the embedding is a gather, not a matmul.

The K-quant policies mirror llama.cpp's `_M` mixes, which users compare against:
- attention values and MLP down projections carry more of the model's error, so in the first and
  last eighth of the layers and every third layer between they get a format one step up;
- an untied lm_head gets q6k (its error lands directly on the logits);
- a row that is not a whole number of 256-weight super-blocks falls back to the legacy format
  llama.cpp picks for that case, and to the build's dtype if it is not a multiple of 32 either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmc.artifacts.manifest import ModelSpec
from llmc.quant.formats import FORMATS, BlockFormat, block_format

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_PROJECTION_RE = re.compile(r"\.(self_attn|mlp|mlp\.shared_expert)\.[a-z_]+_proj\.weight$")
# The step up for the sensitive tensors (attention values, MLP down) of the mixed K-quant policies.
_MORE_BITS = {"q2k": "q4k", "q3k": "q5k", "q4k": "q6k", "q5k": "q6k", "q6k": "q6k"}
# When a row does not fit 256-weight super-blocks: llama.cpp's fallbacks (same bits or more).
_K_FALLBACK = {"q2k": "q4_0", "q3k": "q4_0", "q4k": "q5_0", "q5k": "q5_1", "q6k": "q8_0"}
# Untied output projection: q6k, as llama.cpp's mixes do (legacy formats keep q8_0 precision).
_LM_HEAD_K = "q6k"
_LM_HEAD_LEGACY = "q8_0"


@dataclass(frozen=True)
class QuantChoice:
    name: str
    format: str | None  # None: stays in the build's dtype
    reason: str


def _is_k(fmt: str) -> bool:
    return FORMATS[fmt].block_size == 256


def _more_bits_layer(layer: int, num_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


def _fit(fmt: str, cols: int) -> tuple[str | None, str]:
    """`fmt` if a row of `cols` weights is whole blocks of it, else its fallback (or no quantization)."""
    if FORMATS[fmt].fits(cols):
        return fmt, ""
    fallback = _K_FALLBACK.get(fmt)
    if fallback is not None and FORMATS[fallback].fits(cols):
        return fallback, f"; width {cols} is not a multiple of {FORMATS[fmt].block_size}"
    return None, f"width {cols} is not a multiple of {FORMATS[fmt].block_size}"


def runs_quantized(name: str, shape: list[int]) -> bool:
    """Whether the runtime can run this tensor as GGML blocks (a linear layer's or the embedding's weight)."""
    if len(shape) != 2:
        return False
    if name in ("lm_head.weight", "model.embed_tokens.weight"):
        return True
    return bool(_PROJECTION_RE.search(name)) and not name.endswith("shared_expert_gate.weight")


def plan_quantization(spec: ModelSpec, shapes: dict[str, list[int]], isq: str) -> dict[str, QuantChoice]:
    """For every tensor of the model: its format under `--isq isq` and why."""
    base: BlockFormat = block_format(isq)
    plan: dict[str, QuantChoice] = {}
    for name, shape in sorted(shapes.items()):
        wanted: str | None = None
        why = ""
        output = name == "lm_head.weight" or (name == "model.embed_tokens.weight" and spec.tie_word_embeddings)
        if output and len(shape) == 2:
            wanted = _LM_HEAD_K if _is_k(base.name) else _LM_HEAD_LEGACY
            wanted = base.name if FORMATS[wanted].bits_per_weight() < base.bits_per_weight() else wanted
            why = "output projection (tied to the embedding)" if name != "lm_head.weight" else "output projection"
        elif name != "model.embed_tokens.weight" and runs_quantized(name, shape):
            wanted, why = base.name, "projection"
            layer = _LAYER_RE.match(name)
            sensitive = name.endswith(("v_proj.weight", "down_proj.weight"))
            if _is_k(base.name) and sensitive and layer and _more_bits_layer(int(layer.group(1)), spec.num_layers):
                wanted, why = _MORE_BITS[base.name], "sensitive projection in a more-bits layer"
        if wanted is None:
            plan[name] = QuantChoice(name, None, "kept: not a projection weight")
            continue
        fmt, note = _fit(wanted, shape[-1])
        plan[name] = QuantChoice(name, fmt, (why + note) if fmt is not None else "kept: " + note)
    return plan
