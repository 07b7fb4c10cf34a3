"""Prometheus metrics, one registry per app (so several apps in one process stay apart)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gpt2_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.duration = Histogram("gpt2_request_duration_seconds", "HTTP request duration", ["route"],
                                  buckets=_LATENCY, registry=r)
        self.ttft = Histogram("gpt2_time_to_first_token_seconds", "time from admission to the first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("gpt2_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        self.queue = Gauge("gpt2_queue_size", "generation requests waiting for a batch slot", registry=r)
        self.batch = Gauge("gpt2_batch_size", "rows in the running batch", registry=r)
        self.in_flight = Gauge("gpt2_requests_in_flight", "candidates being served (a request counts its "
                               "prompts x best_of)", registry=r)
        self.input_tokens = Counter("gpt2_input_tokens_total", "prompt tokens", ["task"], registry=r)
        self.generated_tokens = Counter("gpt2_generated_tokens_total", "generated tokens", registry=r)
        self.connections = Gauge("gpt2_connections_open", "open client connections", registry=r)
        self.connections_closed = Counter("gpt2_connections_closed_total", "connections the server cut before a "
                                          "request was whole, by reason", ["reason"], registry=r)
        self.loop_lag = Histogram("gpt2_event_loop_lag_seconds", "how late the event loop ran a 100 ms timer",
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.failures = Counter("gpt2_failures_total", "failed requests by error type", ["error_type"], registry=r)
        self.kv_bytes = Gauge("gpt2_kv_cache_bytes", "KV cache memory: reserved by the runner's buffers, and in "
                                                     "use by the tokens held", ["kind"], registry=r)

    def watch_prefix_cache(self, read: Callable[[], dict[str, int] | None]) -> None:
        """Export the prefix cache's counters, read at each scrape (`Engine.prefix_stats`): vLLM's
        prefix_cache_queries / prefix_cache_hits (prompt tokens), and its memory against the budget."""
        self.registry.register(_ReadCollector(read, [
            (CounterMetricFamily, "gpt2_prefix_cache_queries", "prompt tokens looked up in the prefix cache",
             "queries"),
            (CounterMetricFamily, "gpt2_prefix_cache_hits", "prompt tokens whose KV came from the prefix cache",
             "hits"),
            (CounterMetricFamily, "gpt2_prefix_cache_evicted_blocks", "blocks evicted from the prefix cache",
             "evicted_blocks"),
            (GaugeMetricFamily, "gpt2_prefix_cache_bytes", "prefix cache memory in use", "bytes_in_use"),
            (GaugeMetricFamily, "gpt2_prefix_cache_budget_bytes", "prefix cache budget (PREFIX_CACHE_MB)",
             "budget_bytes"),
        ]))

    def watch_speculation(self, read: Callable[[], dict[str, int] | None]) -> None:
        """Export speculative decoding's counters (`Engine.speculation_stats`): vLLM's spec_decode
        draft tokens proposed and accepted."""
        self.registry.register(_ReadCollector(read, [
            (CounterMetricFamily, "gpt2_spec_decode_num_draft_tokens", "tokens proposed by speculation and verified",
             "proposed_tokens"),
            (CounterMetricFamily, "gpt2_spec_decode_num_accepted_tokens", "proposed tokens the model accepted",
             "accepted_tokens"),
            (CounterMetricFamily, "gpt2_spec_decode_num_steps", "decode steps that verified proposals", "steps"),
        ]))


class _ReadCollector(Collector):
    """Metrics read from `read()` at each scrape (none while it returns None): one family per
    (CounterMetricFamily or GaugeMetricFamily, name, help, key of the dict read)."""

    def __init__(self, read: Callable[[], dict[str, int] | None],
                 families: list[tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, str]]) -> None:
        self.read = read
        self.families = families

    def collect(self) -> Iterator[Metric]:
        st = self.read()
        if st is None:
            return
        for family, name, doc, key in self.families:
            yield family(name, doc, value=st[key])
