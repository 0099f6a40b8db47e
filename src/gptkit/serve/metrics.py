"""Prometheus metrics of one server (a registry of its own, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, queued, running, kv_stats):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptkit_requests", "Generation requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("gptkit_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("gptkit_generated_tokens", "Tokens generated", registry=r)
        Gauge("gptkit_queue_depth", "Requests waiting for a row", registry=r).set_function(queued)
        Gauge("gptkit_running_rows", "Requests being decoded", registry=r).set_function(running)
        for key, text in (("bytes", "Bytes of the KV cache's budget"), ("blocks", "KV blocks in the budget"),
                          ("blocks_in_use", "KV blocks held by running requests"),
                          ("evictions", "Cached KV blocks evicted for new ones"),
                          ("reused_blocks", "KV blocks reused from the prefix cache")):
            Gauge(f"gptkit_kv_{key}", text, registry=r).set_function(lambda key=key: kv_stats()[key])
        self.ttft = Histogram("gptkit_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram("gptkit_time_per_output_token_seconds", "Between consecutive tokens",
                                       buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
