"""Issue 4: clients that disconnect mid-stream free their KV blocks at once; nothing leaks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmc.builder.build import BuildOptions, build
from tests.server import running_server

CLIENTS = 50
# How long the server may take to notice 50 closed connections and free their blocks.
SETTLE_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def base_url(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = tmp_path_factory.mktemp("disconnect") / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, name="tiny"))
    with running_server(out) as url:
        yield url


def _gauges(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_50_clients_disconnecting_mid_stream_free_everything(base_url: str) -> None:
    async def one(client: httpx.AsyncClient, index: int) -> int:
        body = {
            "model": "tiny",
            "prompt": f"request {index}: the fox",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
        chunks = 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                if chunks == 3:
                    break  # leave mid-stream: the connection closes with the context
        return chunks

    async def run_all() -> list[int]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(CLIENTS)))

    assert asyncio.run(run_all()) == [3] * CLIENTS
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        gauges = _gauges(base_url)
        if gauges["llmc_kv_cache_usage_ratio"] == 0 and gauges["llmc_num_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, gauges
        time.sleep(0.2)
    assert gauges["llmc_num_requests_waiting"] == 0
    ok = {"model": "tiny", "prompt": "still serving?", "max_tokens": 3}
    assert httpx.post(f"{base_url}/v1/completions", json=ok, timeout=60).status_code == 200
