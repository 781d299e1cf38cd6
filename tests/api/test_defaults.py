"""Issue 19: sampling defaults from the artifact, then `llmc run`'s flags, then the request; a
context that fits the KV cache; GET /v1/models/{id} through the openai SDK."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import make_tiny_llama
from tests.server import free_port, running_server

# What the tiny model's generation_config.json says: every key llmc reads, as a model card would.
SOURCE_CONFIG = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_new_tokens": 3,
    "eos_token_id": 0,
    "transformers_version": "4.45.0",
}
MODEL_CONTEXT = 4096  # the tiny model's max_position_embeddings: more than the small KV caches below hold
KV_BLOCKS = 8  # 8 blocks of 16 tokens: a 128-token context
FITTED_CONTEXT = 128
PROMPT = "The quick brown fox"


def _llmc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmc", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("gen") / "llama", max_position_embeddings=MODEL_CONTEXT)
    (folder / "generation_config.json").write_text(json.dumps(SOURCE_CONFIG))
    return folder


@pytest.fixture(scope="module")
def artifact(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen-artifact") / "a"
    built = _llmc("build", "--m", str(source), "-o", str(out), "--name", "tiny", "--no-compile", "--json")
    assert built.returncode == 0, built.stderr
    return out


def _inspect(artifact: Path) -> dict[str, object]:
    result = _llmc("inspect", str(artifact), "--json")
    assert result.returncode == 0, result.stderr
    generation: dict[str, object] = json.loads(result.stdout)["generation"]
    return generation


def test_the_artifact_takes_the_sources_generation_config(artifact: Path) -> None:
    assert _inspect(artifact) == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.05,
        "max_tokens": 3,
        "origin": "generation_config.json",
    }


def test_build_generation_config_flag_inline_and_file(source: Path, tmp_path: Path) -> None:
    inline = _llmc(
        "build", "--m", str(source), "-o", str(tmp_path / "inline"), "--no-compile",
        "--generation-config", '{"temperature": 0.2, "top_k": 5}',
    )  # fmt: skip
    assert inline.returncode == 0, inline.stderr
    shown = _inspect(tmp_path / "inline")
    assert (shown["temperature"], shown["top_k"], shown["top_p"], shown["max_tokens"]) == (0.2, 5, 0.8, 3)
    assert shown["origin"] == "generation_config.json + --generation-config"
    file = tmp_path / "gen.json"
    file.write_text(json.dumps({"do_sample": False, "max_new_tokens": 50}))
    from_file = _llmc(
        "build", "--m", str(source), "-o", str(tmp_path / "file"), "--no-compile", "--generation-config", str(file)
    )
    assert from_file.returncode == 0, from_file.stderr
    shown = _inspect(tmp_path / "file")
    assert (shown["temperature"], shown["top_k"], shown["max_tokens"]) == (0.0, 0, 50)
    bad = _llmc("build", "--m", str(source), "-o", str(tmp_path / "bad"), "--generation-config", '{"top_p": 7}')
    assert bad.returncode == 2 and "top_p is 7" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gen-log") / "server.log"


@pytest.fixture(scope="module")
def flagged(artifact: Path, server_log: Path) -> Iterator[OpenAI]:
    """The artifact served with run flags over its defaults, in a KV cache smaller than its context."""
    flags = ["--kv-blocks", str(KV_BLOCKS), "--temperature", "0", "--max-tokens", "5", "--generation-config"]
    with running_server(artifact, *flags, '{"top_p": 0.5, "top_k": 7}', "--top-k", "9", log=server_log) as base:
        yield OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_show_the_effective_defaults_and_retrieve_works(flagged: OpenAI) -> None:
    [card] = flagged.models.list().data
    retrieved = flagged.models.retrieve("tiny")
    assert retrieved.id == card.id == "tiny"
    defaults = (retrieved.model_extra or {})["generation_defaults"]
    # artifact (0.7 / 0.8 / 20 / rp 1.05 / 3), then --generation-config (top_p, top_k), then single flags
    assert defaults["temperature"] == 0.0 and defaults["top_p"] == 0.5 and defaults["top_k"] == 9
    assert defaults["repetition_penalty"] == 1.05 and defaults["max_tokens"] == 5
    assert (card.model_extra or {})["generation_defaults"] == defaults
    with pytest.raises(openai.NotFoundError) as missing:
        flagged.models.retrieve("not-this-model")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        flagged.models.retrieve("owner/other")  # an id with a slash reaches the route too


def test_flags_win_over_the_artifact_and_the_request_over_both(flagged: OpenAI) -> None:
    def tokens(extra: dict[str, object] | None = None, **request: object) -> tuple[str, int]:
        body = {"ignore_eos": True, **(extra or {})}
        reply = flagged.completions.create(model="tiny", prompt=PROMPT, extra_body=body, **request)  # type: ignore[call-overload]
        assert reply.usage is not None
        return reply.choices[0].text, reply.usage.completion_tokens

    default_text, default_count = tokens()
    assert default_count == 5  # --max-tokens 5 over the artifact's 3
    assert tokens(max_tokens=7)[1] == 7  # the request over both
    # --temperature 0 over the artifact's 0.7: the default is greedy, and equal to a greedy request
    assert tokens(max_tokens=5, temperature=0)[0] == default_text == tokens()[0]
    hot = {tokens({"top_k": 0}, max_tokens=5, temperature=2.0, top_p=1.0, seed=seed)[0] for seed in range(4)}
    assert hot != {default_text}  # a request's own temperature samples


def test_artifact_defaults_apply_without_flags(artifact: Path) -> None:
    with running_server(artifact, "--kv-blocks", str(KV_BLOCKS)) as base:
        body = {"model": "tiny", "prompt": PROMPT, "ignore_eos": True}
        reply = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 3  # the source's max_new_tokens
        card = httpx.get(f"{base}/v1/models/tiny", timeout=10).json()
        assert card["generation_defaults"]["temperature"] == 0.7 and card["max_model_len"] == FITTED_CONTEXT
        missing = httpx.get(f"{base}/v1/models/nope", timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert httpx.post(f"{base}/v1/models/tiny", json={}, timeout=10).status_code == 405


def test_a_context_larger_than_the_cache_is_fitted_and_logged(flagged: OpenAI, server_log: Path) -> None:
    assert (flagged.models.list().data[0].model_extra or {})["max_model_len"] == FITTED_CONTEXT
    fitted = [line for line in server_log.read_text().splitlines() if "engine.context_fitted" in line]
    assert fitted, server_log.read_text()
    assert str(FITTED_CONTEXT) in fitted[0] and str(MODEL_CONTEXT) in fitted[0] and "--max-model-len" in fitted[0]


def test_an_explicit_context_the_cache_cannot_hold_exits_2(artifact: Path) -> None:
    result = _llmc(
        "run", str(artifact), "--p", str(free_port()), "--kv-blocks", str(KV_BLOCKS), "--max-model-len", "1024"
    )
    assert result.returncode == 2, result.stderr
    assert f"holds {FITTED_CONTEXT} tokens, fewer than --max-model-len 1024" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_run_sampling_flags_exit_2_before_loading(artifact: Path) -> None:
    port = str(free_port())
    bad_json = _llmc("run", str(artifact), "--p", port, "--generation-config", '{"temperature": -1}')
    assert bad_json.returncode == 2 and "temperature is -1" in bad_json.stderr, bad_json.stderr
    bad_flag = _llmc("run", str(artifact), "--p", port, "--top-p", "0")
    assert bad_flag.returncode == 2 and "--top-p" in bad_flag.stderr, bad_flag.stderr


def test_a_source_without_sampling_settings_gets_the_fallback(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "plain")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "transformers_version": "4.45.0"}))
    built = _llmc("build", "--m", str(folder), "-o", str(tmp_path / "a"), "--no-compile")
    assert built.returncode == 0, built.stderr
    shown = _inspect(tmp_path / "a")
    assert (shown["temperature"], shown["top_p"], shown["top_k"], shown["min_p"]) == (0.8, 0.95, 40, 0.05)
    assert str(shown["origin"]).startswith("llmc defaults")
