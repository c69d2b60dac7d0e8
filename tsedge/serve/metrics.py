"""The server's Prometheus metrics (``GET /metrics``), one registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; TTFT spans a cached one-token prefill on a GPU to a long prompt on a CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class Metrics:
    """Counters and histograms of requests and tokens; the Selection Cache hit rate when the
    library's policy selects tokens (``selecting``)."""

    def __init__(self, selecting: bool) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tsedge_requests", "Requests by endpoint and outcome (finish reason, "
                                "cancelled, or the HTTP status of an error)", ["endpoint", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("tsedge_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("tsedge_cached_prompt_tokens",
                                     "Prompt tokens reused from the KV cache (not prefilled again)", registry=r)
        self.generated_tokens = Counter("tsedge_generated_tokens", "Tokens generated", registry=r)
        self.cache_corrections = Counter("tsedge_cache_corrections", "KV cache corrections (--cache-correction: "
                                         "decoded tokens prefilled again)", registry=r)
        self.ttft = Histogram("tsedge_time_to_first_token_seconds",
                              "From the request's arrival (queue wait included) to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("tsedge_time_per_output_token_seconds",
                                       "Between consecutive generated tokens of a request",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.queued = Gauge("tsedge_requests_waiting", "Requests queued or running", registry=r)
        self.selection_hits = self.selection_lookups = None
        self._selection = [0, 0]  # hits, lookups (the gauge's source)
        if selecting:
            self.selection_hits = Counter("tsedge_selection_cache_hits",
                                          "Decode steps that reused the previous selection", registry=r)
            self.selection_lookups = Counter("tsedge_selection_cache_lookups",
                                             "Decode steps that checked the Selection Cache", registry=r)
            hit_rate = Gauge("tsedge_selection_cache_hit_rate",
                             "Selection Cache hits / lookups since the server started", registry=r)
            hit_rate.set_function(self._hit_rate)

    def _hit_rate(self) -> float:
        hits, lookups = self._selection
        return hits / lookups if lookups else 0.0

    def add_selection(self, hits: int, lookups: int) -> None:
        """Count one request's Selection Cache hits and lookups."""
        self.selection_hits.inc(hits)
        self.selection_lookups.inc(lookups)
        self._selection = [self._selection[0] + hits, self._selection[1] + lookups]

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
