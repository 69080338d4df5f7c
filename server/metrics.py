"""Prometheus metrics of one app: requests, latency, tokens, time to first token, inter-token latency,
and gauges and prefix-cache counters read from the engine client when scraped."""

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX_CACHE = {"hits": (CounterMetricFamily, "Prompts that reused a cached prefix."),
                "misses": (CounterMetricFamily, "Prompts that found none."),
                "hit_tokens": (CounterMetricFamily, "Prompt tokens not prefilled thanks to the cache."),
                "evicted_blocks": (CounterMetricFamily, "Blocks recycled for newer prefixes."),
                "blocks_used": (GaugeMetricFamily, "Pool blocks holding a prefix. (16 tokens a block)"),
                "blocks_total": (GaugeMetricFamily, "Pool blocks. (16 tokens a block)")}


class Metrics:
    def __init__(self, client):
        prom.disable_created_metrics()  # no *_created samples: they double the exposition for nothing
        r = self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("gpt2i_requests", "HTTP requests by endpoint and status.",
                                     ["endpoint", "status"], registry=r)
        self.latency = prom.Histogram("gpt2i_request_latency_seconds", "Request latency (streams: to the end).",
                                      ["endpoint"], registry=r,
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = prom.Counter("gpt2i_tokens", "Tokens processed, by kind (prompt, completion).", ["kind"],
                                   registry=r)
        self.cancelled = prom.Counter("gpt2i_cancelled", "Generations cancelled (client gone or shutdown).",
                                      registry=r)
        self.ttft = prom.Histogram("gpt2i_time_to_first_token_seconds", "Admission to first output.", registry=r,
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = prom.Histogram("gpt2i_inter_token_latency_seconds", "Time between tokens of one choice.",
                                  registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.restarts = prom.Counter("gpt2i_engine_restarts", "Engine processes replaced after they died.",
                                     registry=r)
        for name, help_, key in (("gpt2i_requests_waiting", "Requests waiting for the engine.", "waiting"),
                                 ("gpt2i_requests_running", "Requests being decoded.", "running"),
                                 ("gpt2i_kv_slots_used", "KV-cache slots in use.", "slots_used"),
                                 ("gpt2i_kv_slots_total", "KV-cache slots.", "slots_total")):
            prom.Gauge(name, help_, registry=r).set_function(lambda key=key: client.stats[key])
        prom.Gauge("gpt2i_requests_admitted", "Generations held against --max-queue.",
                   registry=r).set_function(lambda: client.admitted())
        prom.Gauge("gpt2i_model_loaded", "1 when the model is loaded.",
                   registry=r).set_function(lambda: int(client.status == "ok"))
        self.client = client
        r.register(self)  # collect() below

    def collect(self):
        """gpt2i_prefix_cache_*: the engine's counters as of its last step, and the pool's use."""
        stats = self.client.stats.get("prefix_cache") or {}
        for key, (family, help_) in PREFIX_CACHE.items():
            yield family(f"gpt2i_prefix_cache_{key}", help_, value=stats.get(key, 0))

    def exposition(self):
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
