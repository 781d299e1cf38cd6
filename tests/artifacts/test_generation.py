"""Sampling defaults: from the source's generation config, flags, and the request, in that order."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import pytest

from llmc.artifacts import generation
from llmc.artifacts.manifest import GenerationDefaults
from llmc.errors import BadArtifactError, BadInputError, OutOfResourcesError
from llmc.runtime.api.protocol import ChatCompletionRequest
from llmc.runtime.api.requests import sampling_params
from llmc.runtime.engine import EngineConfig, fit_context


def test_a_source_without_sampling_settings_gets_llama_cpp_like_defaults() -> None:
    for config in ({}, {"eos_token_id": [1, 2], "transformers_version": "4.45"}, {"do_sample": True}):
        defaults = generation.from_source(config)
        assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.min_p) == (0.8, 0.95, 40, 0.05)
        assert defaults.origin == generation.FALLBACK_ORIGIN


def test_a_source_that_states_sampling_settings_is_followed() -> None:
    config = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 256, "repetition_penalty": 1.05}
    defaults = generation.from_source(config)
    assert defaults == GenerationDefaults(
        temperature=0.6, top_p=0.9, top_k=0, min_p=0.0, repetition_penalty=1.05, max_tokens=256,
        origin="generation_config.json",
    )  # fmt: skip
    # do_sample false is transformers' greedy decoding, whatever temperature it names
    greedy = generation.from_source({"do_sample": False, "temperature": 0.6, "top_k": 20})
    assert (greedy.temperature, greedy.top_k) == (0.0, 0)


def test_a_source_value_out_of_range_is_dropped_not_fatal() -> None:
    defaults = generation.from_source({"temperature": 50, "top_p": 0.5, "top_k": 2.5, "min_p": float("nan")})
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.min_p) == (1.0, 0.5, 0, 0.0)


def test_generation_config_flag_inline_and_file(tmp_path: Path) -> None:
    assert generation.load_arg('{"temperature": 0.2, "top_k": -1, "max_tokens": 9, "foo": 1}') == {
        "temperature": 0.2,
        "top_k": 0,
        "max_tokens": 9,
    }
    file = tmp_path / "generation_config.json"
    file.write_text(json.dumps({"temperature": 0.3, "max_new_tokens": 12, "eos_token_id": 2}))
    assert generation.load_arg(str(file)) == {"temperature": 0.3, "max_tokens": 12}
    assert generation.load_arg(str(tmp_path)) == {"temperature": 0.3, "max_tokens": 12}  # a model folder
    for bad, says in [
        ('{"temperature": 3}', "temperature is 3"),
        ('{"top_p": 0}', "top_p is 0"),
        ('{"max_new_tokens": 0}', "max_new_tokens is 0"),
        ('{"temperature": 0.5', "not valid JSON"),
        ("[1, 2]", "neither"),
        (str(tmp_path / "missing.json"), "neither"),
    ]:
        with pytest.raises(BadInputError, match=says):
            generation.load_arg(bad)


def test_override_keeps_what_it_does_not_name() -> None:
    base = generation.from_source({"temperature": 0.6, "top_p": 0.9})
    merged = generation.override(base, {"top_p": 0.5, "max_tokens": 4}, "llmc run flags")
    assert (merged.temperature, merged.top_p, merged.max_tokens) == (0.6, 0.5, 4)
    assert merged.origin == "generation_config.json + llmc run flags"
    assert generation.override(base, {}, "nothing") is base


def test_artifacts_from_before_origins_get_the_fallback_and_others_keep_theirs() -> None:
    legacy = GenerationDefaults(temperature=1.0, top_p=1.0, top_k=0)
    assert generation.effective(legacy).temperature == 0.8
    stated = GenerationDefaults(temperature=1.0, top_p=1.0, top_k=0, origin="generation_config.json")
    assert generation.effective(stated) == stated
    old_but_set = GenerationDefaults(temperature=0.7, top_p=0.8, top_k=20)
    assert generation.effective(old_but_set) == old_but_set


def test_a_manifest_with_defaults_no_request_could_send_is_refused() -> None:
    for bad in (
        GenerationDefaults(temperature=math.nan),
        GenerationDefaults(top_p=0.0),
        GenerationDefaults(top_k=-5),
        GenerationDefaults(max_tokens=0),
    ):
        with pytest.raises(BadArtifactError, match="generation"):
            generation.check(bad)
    generation.check(generation.FALLBACK)


def _defaults(**values: object) -> dict[str, object]:
    return msgspec.structs.asdict(msgspec.structs.replace(generation.FALLBACK, **values))


def test_the_request_wins_over_the_server_defaults() -> None:
    defaults = _defaults(temperature=0.3, repetition_penalty=1.1)
    bare = ChatCompletionRequest(model="m", messages=[])
    [params] = sampling_params(bare, defaults, 7, None, 100)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.3, 0.95, 40, 0.05)
    assert (params.repetition_penalty, params.max_tokens) == (1.1, 7)
    own = ChatCompletionRequest(
        model="m", messages=[], temperature=0.9, top_p=0.5, top_k=-1, min_p=0.0, repetition_penalty=1.0
    )
    [params] = sampling_params(own, defaults, 7, 3, 100)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.9, 0.5, 0, 0.0)
    assert (params.repetition_penalty, params.max_tokens) == (1.0, 3)


def test_context_fits_the_kv_cache_unless_asked_for_explicitly() -> None:
    bytes_per_block = 1024 * 1024  # 1 MiB per 16-token block
    assert fit_context(4096, EngineConfig(), 1024, bytes_per_block) == 4096  # fits: the model's own
    assert fit_context(4096, EngineConfig(max_model_len=1000), 1024, bytes_per_block) == 1000
    assert fit_context(4096, EngineConfig(kv_cache_mb=64), 64, bytes_per_block) == 1024  # 64 blocks of 16
    with pytest.raises(BadInputError, match="holds 1024 tokens, fewer than --max-model-len 4096") as explicit:
        fit_context(4096, EngineConfig(kv_cache_mb=64, max_model_len=4096), 64, bytes_per_block)
    assert "--mem 256" in explicit.value.message and "1024 or less" in explicit.value.message
    with pytest.raises(OutOfResourcesError, match="does not hold one KV cache block"):
        fit_context(4096, EngineConfig(kv_cache_mb=1), 0, 2 * bytes_per_block)
