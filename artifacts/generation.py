"""Default sampling settings: what a request that names none gets.

Where they come from, lowest precedence first: the source's generation_config.json (HF folders and
hub ids) or, where it has none, llmc's conservative defaults; `llmc build --generation-config`;
`llmc run --generation-config` and `--temperature/--top-p/--top-k/--min-p/--max-tokens`; the
request itself. The artifact stores the build's result (Manifest.generation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec

from llmc.artifacts.manifest import MAX_POSITION_EMBEDDINGS, GenerationDefaults
from llmc.errors import BadArtifactError, BadInputError
from llmc.logs import get_logger
from llmc.runtime.api.requests import MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY

log = get_logger("llmc.generation")

# Used where the source says nothing about sampling (every GGUF file, HF folders without a
# generation_config.json or with one that names no sampling key): the defaults llama.cpp's server
# ships. Sampling at temperature 1.0 with no cut-off, what the OpenAI API implies, lets small
# models wander off the topic within a sentence; a little cooling and cutting off the unlikely
# tail (top-k 40, top-p 0.95, min-p 0.05) keeps answers on topic without making them greedy.
FALLBACK_ORIGIN = "llmc defaults (the source names no sampling settings)"
FALLBACK = GenerationDefaults(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, origin=FALLBACK_ORIGIN)
SOURCE_ORIGIN = "generation_config.json"
GGUF_SAMPLING_ORIGIN = "GGUF general.sampling.*"
# What an artifact built before llmc recorded an origin stored when the source said nothing: it
# cannot tell "the source asked for plain sampling" from "the source said nothing", so the runtime
# treats these values as the latter (FALLBACK) rather than serve rambling answers.
_LEGACY_UNSET = GenerationDefaults(temperature=1.0, top_p=1.0, top_k=0)
# The sampling keys of an HF generation config. A config that names one of them states how the
# model should be sampled; the keys it leaves out then take their neutral values, as in vLLM.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")
# A generation config is a few hundred bytes; a `--generation-config` file bigger than this is
# some other file given by mistake.
MAX_CONFIG_BYTES = 1024 * 1024
# top_k is compared with the vocabulary size at sampling; no vocabulary reaches 2^24 (manifest.py).
MAX_TOP_K = 1 << 24


def _number(value: Any) -> float | None:
    """A JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _check(key: str, value: Any) -> float | int | None:
    """`value` as the type of `key` when it lies in the range a request may send, else None."""
    number = _number(value)
    if number is None or math.isnan(number):
        return None
    if key == "temperature":
        return number if 0.0 <= number <= MAX_TEMPERATURE else None
    if key == "top_p":
        return number if 0.0 < number <= 1.0 else None
    if key == "min_p":
        return number if 0.0 <= number <= 1.0 else None
    if key == "repetition_penalty":
        return number if MIN_REPETITION_PENALTY <= number <= MAX_REPETITION_PENALTY else None
    if not number.is_integer():
        return None
    if key == "top_k":  # -1 is vLLM's spelling of "no top-k"
        return 0 if number == -1 else int(number) if 0 <= number <= MAX_TOP_K else None
    if key == "max_tokens":
        return int(number) if 1 <= number <= MAX_POSITION_EMBEDDINGS else None
    raise AssertionError(key)


_RANGES = {
    "temperature": f"0..{MAX_TEMPERATURE:g}",
    "top_p": "(0, 1]",
    "top_k": f"0..{MAX_TOP_K} (-1: no cut)",
    "min_p": "0..1",
    "repetition_penalty": f"{MIN_REPETITION_PENALTY:g}..{MAX_REPETITION_PENALTY:g}",
    "max_tokens": f"1..{MAX_POSITION_EMBEDDINGS}",
}


def parse(config: dict[str, Any], where: str, strict: bool) -> dict[str, Any]:
    """The settings an HF-style generation config states, validated and under llmc's names.

    Known keys: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens (or
    max_tokens) and do_sample (false: greedy). Others (eos_token_id, transformers_version, ...) are
    ignored; null means unset. A value out of range raises BadInputError when `strict` (the user's
    own flags), else is dropped with a warning (a source's file must not stop a build).
    """
    out: dict[str, Any] = {}
    names = {key: key for key in _RANGES} | {"max_new_tokens": "max_tokens"}
    for name, key in names.items():
        if config.get(name) is None:
            continue
        value = _check(key, config[name])
        if value is not None:
            out[key] = value
        elif strict:
            raise BadInputError(f"{where}: {name} is {config[name]!r}; it must be in {_RANGES[key]}", param=name)
        else:
            log.warning("generation.value_ignored", where=where, key=name, allowed=_RANGES[key])
    if config.get("do_sample") is False:  # transformers' greedy decoding, whatever else it says
        out.update(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    elif "do_sample" in config and not isinstance(config["do_sample"], bool | None) and strict:
        raise BadInputError(f"{where}: do_sample must be true or false", param="do_sample")
    return out


def from_source(config: dict[str, Any], origin: str | None = None) -> GenerationDefaults:
    """The artifact's defaults from the source's generation config ({} where it has none);
    `origin` names where it came from (default: generation_config.json)."""
    origin = origin or SOURCE_ORIGIN
    stated = parse(config, origin, strict=False)
    sampling = any(key in stated for key in SAMPLING_KEYS)
    base = GenerationDefaults(origin=origin) if sampling else FALLBACK
    return msgspec.structs.replace(base, **stated)


def override(base: GenerationDefaults, values: dict[str, Any], origin: str) -> GenerationDefaults:
    """`base` with the settings `values` states (already parsed) replaced; `origin` names them."""
    if not values:
        return base
    return msgspec.structs.replace(base, **values, origin=f"{base.origin or 'artifact'} + {origin}")


def load_arg(value: str, flag: str = "--generation-config") -> dict[str, Any]:
    """The settings of a `--generation-config` value: inline JSON (starts with '{'), a JSON file
    such as a model's generation_config.json, or a model folder holding one (as vLLM takes).
    BadInputError (exit 2) naming the flag otherwise."""
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if path.is_dir():
            path = path / "generation_config.json"
        if not path.is_file():
            raise BadInputError(f"{flag} takes a JSON object or a JSON file; {value!r} is neither", param=flag)
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise BadInputError(f"{flag} {value} is over {MAX_CONFIG_BYTES} bytes; is it a generation config?")
        text = path.read_text(encoding="utf-8", errors="replace")
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser recurses
        raise BadInputError(f"{flag} is not valid JSON: {exc or 'nested too deeply'}", param=flag) from exc
    if not isinstance(config, dict):
        raise BadInputError(f'{flag} must be a JSON object such as {{"temperature": 0.7}}', param=flag)
    return parse(config, flag, strict=True)


def effective(stored: GenerationDefaults) -> GenerationDefaults:
    """The defaults an artifact's stored ones mean: an artifact built before llmc recorded their
    origin holds 1.0/1.0/0 where its source said nothing, which means FALLBACK today."""
    if stored.origin is None and stored == _LEGACY_UNSET:
        return msgspec.structs.replace(FALLBACK, origin=FALLBACK_ORIGIN + "; built by an older llmc")
    return stored


def check(stored: GenerationDefaults) -> None:
    """Refuse a manifest whose defaults no request could send (NaN, temperature 1e9, ...)."""
    for key in _RANGES:
        value = getattr(stored, key)
        if value is not None and _check(key, value) is None:
            raise BadArtifactError(
                f"the artifact's manifest is inconsistent: generation.{key} is {value!r}, outside "
                f"{_RANGES[key]}; rebuild the artifact with `llmc build`",
                param=f"generation.{key}",
            )
