"""Issue 6: /tokenize, /detokenize, /metrics, /openapi.json and API-key auth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmc.builder.build import BuildOptions, build
from tests.server import running_server

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def tiny_artifact(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("svc") / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, name="tiny"))
    return out


@pytest.fixture(scope="module")
def client(tiny_artifact: Path) -> Iterator[httpx.Client]:
    with running_server(tiny_artifact) as base, httpx.Client(base_url=base, timeout=60) as http:
        yield http


def _metrics(client: httpx.Client) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = sample.name + ("" if not sample.labels else str(sorted(sample.labels.items())))
            values[key] = sample.value
    return values


def test_tokenize_roundtrip(client: httpx.Client) -> None:
    tokens = client.post("/tokenize", json={"prompt": "The quick brown fox"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == 256
    text = client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "The quick brown fox"
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert (
        client.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"].endswith("<|im_start|>assistant\n")
    )
    assert client.post("/tokenize", json={}).status_code == 400
    assert client.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_metrics_move_with_traffic(client: httpx.Client) -> None:
    before = _metrics(client)
    body = {"model": "tiny", "prompt": "The fox", "max_tokens": 5, "ignore_eos": True}
    for _ in range(2):
        assert client.post("/v1/completions", json=body).status_code == 200
    after = _metrics(client)
    assert after["llmc_generation_tokens_total"] - before.get("llmc_generation_tokens_total", 0) == 10
    ok = "llmc_requests_total[('route', '/v1/completions'), ('status', '200')]"
    assert after[ok] - before.get(ok, 0) == 2
    ttft, itl = "llmc_time_to_first_token_seconds_count", "llmc_inter_token_latency_seconds_count"
    assert after[ttft] - before.get(ttft, 0) == 2
    assert after[itl] > before.get(itl, 0)
    assert "llmc_kv_cache_usage_ratio" in after and "llmc_num_requests_running" in after


def test_openapi_describes_every_route(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in ["/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]:
        assert path in spec["paths"]
    assert spec["paths"]["/v1/models/{model}"]["get"]["parameters"][0]["name"] == "model"
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")


def test_api_key_is_required_except_for_health(tiny_artifact: Path) -> None:
    with running_server(tiny_artifact, "--api-key", KEY) as base, httpx.Client(base_url=base, timeout=60) as http:
        assert http.get("/health").status_code == 200
        denied = http.get("/v1/models")
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/v1/models/tiny").status_code == 401
        allowed = http.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert allowed.status_code == 200
