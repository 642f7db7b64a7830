"""Prometheus metrics (prometheus-client), named `kiln:*` and labelled by model.

Per-request histograms and counters are observed by the API process as requests finish. Engine
state (running/waiting requests, KV usage, preemptions, prefix-cache queries and hits) comes from
the worker's latest `Stats` and is read at scrape time by a collector, so it is never stale by more
than one engine step.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kiln.outputs import CompletionOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # no `*_created` series: they double the exposition for nothing we use

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector(Collector):
    def __init__(self, model: str, engine_state: Callable[[], dict | None]):
        self.model = model
        self.engine_state = engine_state

    def collect(self):
        s = self.engine_state()
        if s is None:
            return
        labels = [self.model]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"kiln:{name}", doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"kiln:{name}", doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("num_requests_running", "Sequences in the engine's running batch.", s["running"])
        yield gauge("num_requests_waiting", "Requests waiting: in the API queue and in the engine.",
                    s["waiting"])
        yield gauge("kv_cache_usage_perc", "Share of KV cache blocks in use (0 to 1).", s["kv_usage"])
        yield gauge("kv_cache_free_blocks", "KV cache blocks free (cached prefixes count as free).",
                    s["free_blocks"])
        yield gauge("kv_cache_total_blocks", "KV cache blocks in the pool.", s["total_blocks"])
        yield counter("num_preemptions", "Sequences preempted for lack of KV blocks.", s["preemptions"])
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s["prefix_queries"])
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_hits"])
        yield counter("engine_steps", "Engine steps run by the worker.", s["steps"])
        yield counter("engine_step_seconds", "Wall time of all engine steps (their mean: rate of this "
                      "over rate of kiln:engine_steps_total).", s["step_seconds"])


class ServerMetrics:
    def __init__(self, model: str, engine_state: Callable[[], dict | None]):
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r, lab = self.registry, ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(f"kiln:{name}", doc, lab, buckets=buckets, registry=r).labels(model)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between a request's tokens.", _ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Arrival to first scheduled step.",
                               _LATENCY_BUCKETS)
        self.prefill_time = hist("request_prefill_time_seconds", "First scheduled step to first token.",
                                 _LATENCY_BUCKETS)
        self.decode_time = hist("request_decode_time_seconds", "First token to last token.",
                                _LATENCY_BUCKETS)
        self.prompt_tokens_hist = hist("request_prompt_tokens", "Prompt tokens per request.",
                                       _TOKEN_BUCKETS)
        self.generation_tokens_hist = hist("request_generation_tokens",
                                           "Generated tokens per request (all choices).", _TOKEN_BUCKETS)
        self.prompt_tokens = Counter("kiln:prompt_tokens", "Prompt tokens processed.", lab,
                                     registry=r).labels(model)
        self.generation_tokens = Counter("kiln:generation_tokens", "Tokens generated.", lab,
                                         registry=r).labels(model)
        self._success = Counter("kiln:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._rejected = Counter("kiln:request_rejected", "Requests refused before running, by reason.",
                                 ["model_name", "reason"], registry=r)
        for reason in ("stop", "length", "abort"):
            self._success.labels(model, reason)
        for reason in ("queue_full", "queued_tokens", "timeout", "draining", "loading", "invalid",
                       "client_gone"):
            self._rejected.labels(model, reason)
        r.register(_EngineCollector(model, engine_state))

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model, reason).inc()

    def finished(self, arrival: float, prompt_tokens: int, generated: int, outputs: list[CompletionOutput],
                 complete: bool = True) -> None:
        """Observe one finished request (every choice of every prompt in it). `generated` counts
        every token it produced (already added to generation_tokens_total as they came);
        `complete` is False when the client left before every choice ended: it counts as aborted."""
        reason = "stop"
        if not complete or any(o.finish_reason == "abort" for o in outputs):
            reason = "abort"
        elif any(o.finish_reason == "length" for o in outputs):
            reason = "length"
        self._success.labels(self.model, reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prompt_tokens_hist.observe(prompt_tokens)
        self.generation_tokens_hist.observe(generated)
        ms = [o.metrics for o in outputs if o.metrics is not None]
        firsts = [m.first_token_time for m in ms if m.first_token_time is not None]
        scheduled = [m.first_scheduled_time for m in ms if m.first_scheduled_time is not None]
        ends = [m.finished_time for m in ms if m.finished_time is not None]
        if scheduled:
            self.queue_time.observe(max(0.0, min(scheduled) - arrival))
        if firsts:
            self.ttft.observe(max(0.0, min(firsts) - arrival))
            if scheduled:
                self.prefill_time.observe(max(0.0, min(firsts) - min(scheduled)))
            if ends:
                self.decode_time.observe(max(0.0, max(ends) - min(firsts)))
        if ends:
            self.e2e.observe(max(0.0, max(ends) - arrival))

    def render(self) -> bytes:
        return generate_latest(self.registry)
