"""Prometheus metrics, in a registry of the app's own (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Latency buckets in seconds: from one fast CPU decode step (~5 ms) to a long queue wait.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector(Collector):
    """Reads the engine's gauges at scrape time, so they are never stale."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        yield GaugeMetricFamily("llmc_num_requests_running", "Sequences being computed", value=stats["running"])
        yield GaugeMetricFamily("llmc_num_requests_waiting", "Sequences waiting for KV blocks", value=stats["waiting"])
        yield GaugeMetricFamily("llmc_kv_cache_usage_ratio", "Share of KV blocks in use", value=stats["kv_usage"])
        yield GaugeMetricFamily("llmc_num_preemptions", "Sequences preempted so far", value=stats["preemptions"])


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llmc_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("llmc_prompt_tokens", "Prompt tokens received", registry=self.registry)
        self.generation_tokens = Counter("llmc_generation_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram(
            "llmc_time_to_first_token_seconds",
            "Request received to first token",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "llmc_inter_token_latency_seconds",
            "Gap between successive outputs of a request",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
