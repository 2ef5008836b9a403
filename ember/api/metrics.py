"""Prometheus metrics by SGLang's names and types (python/sglang/srt/metrics/collector.py), with prometheus-client.

Per request (observed in the API process, where every engine output of every API passes through
`serving.MergedOutputs`): prompt/generation/cached token counters, requests by finish reason, aborted requests,
and the histograms of time to first token, inter-token latency, end-to-end latency and queue time (the engine
stamps how long a request waited before its first forward). Per scrape, from the engine's stats: running and
queued requests, KV tokens used and their share of the pool, the prefix-cache hit rate, the generation
throughput and the speculative accept length.

Always collected: the cost is a few counter updates per engine output, so `--enable-metrics` (SGLang's flag)
is accepted and /metrics works with or without it. ember's own `ember_*` gauges follow SGLang's metrics.
"""
from __future__ import annotations

import collections
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ember.api.serving import engine_stats

router = APIRouter()

TTFT_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400]
ITL_BUCKETS = [0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
               0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000]
E2E_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400]
QUEUE_BUCKETS = [0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 400,
                 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000]
THROUGHPUT_WINDOW_S = 10.0


class MetricsCollector:
    """One registry per server (not the global one: tests run several apps in a process)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        names = list(self.labels)
        r = self.registry

        def counter(name, doc, extra=()):
            return Counter(name, doc, names + list(extra), registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=r)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, names, buckets=buckets, registry=r)

        # prometheus-client appends _total to counters itself
        self.prompt_tokens = counter("sglang:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("sglang:generation_tokens", "Number of generation tokens processed.")
        self.cached_tokens = counter("sglang:cached_tokens", "Number of cached prompt tokens.")
        self.num_requests = counter("sglang:num_requests", "Number of requests processed.", ["finish_reason"])
        self.num_aborted = counter("sglang:num_aborted_requests", "Number of requests aborted.")
        self.ttft = histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.e2e = histogram("sglang:e2e_request_latency_seconds",
                             "Histogram of End-to-end request latency in seconds", E2E_BUCKETS)
        self.queue_time = histogram("sglang:queue_time_seconds", "Histogram of queueing time in seconds.",
                                    QUEUE_BUCKETS)
        self.num_running = gauge("sglang:num_running_reqs", "The number of running requests")
        self.num_queue = gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue")
        self.num_used_tokens = gauge("sglang:num_used_tokens", "The number of used tokens")
        self.token_usage = gauge("sglang:token_usage", "The token usage")
        self.cache_hit_rate = gauge("sglang:cache_hit_rate", "The prefix cache hit rate")
        self.gen_throughput = gauge("sglang:gen_throughput", "The generation throughput (token/s)")
        self.spec_accept_length = gauge("sglang:spec_accept_length", "The average speculative accept length")
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, generated tokens)
        self._prompt_sum = self._cached_sum = 0

    def track(self, n: int) -> "RequestTracker":
        return RequestTracker(self, n)

    def _generated(self, now: float, n: int) -> None:
        self._recent.append((now, n))

    def update_from_stats(self, stats: dict) -> None:
        """Gauges from the engine's stats (engine_core.stats, summed over data-parallel replicas)."""
        lab = self.labels
        self.num_running.labels(**lab).set(stats.get("running", 0))
        self.num_queue.labels(**lab).set(stats.get("waiting", 0))
        total, free, cached = (stats.get(k, 0) or 0 for k in ("total_pages", "free_pages", "cached_pages"))
        used = max(0, total - free - cached) * (stats.get("page_size") or 1)
        self.num_used_tokens.labels(**lab).set(used)
        self.token_usage.labels(**lab).set(used / (total * (stats.get("page_size") or 1)) if total else 0.0)
        self.cache_hit_rate.labels(**lab).set(self._cached_sum / self._prompt_sum if self._prompt_sum else 0.0)
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        self.gen_throughput.labels(**lab).set(sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S)
        accept = stats.get("avg_spec_accept_length")
        if accept is not None:
            self.spec_accept_length.labels(**lab).set(accept)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """The timings of the engine requests of one HTTP request, fed every output as it arrives."""

    def __init__(self, c: MetricsCollector, n: int):
        self.c = c
        self.start = time.monotonic()
        self.last: list[float | None] = [None] * n
        self.done = [False] * n
        self.counted_prompt = [False] * n
        self.queued = [False] * n

    def on_output(self, i: int, out) -> None:
        c, lab, now = self.c, self.c.labels, time.monotonic()
        n_new = len(out.new_token_ids)
        if n_new:
            if self.last[i] is None:
                c.ttft.labels(**lab).observe(now - self.start)
                for _ in range(n_new - 1):  # several tokens in the first output: the rest arrived with it
                    c.itl.labels(**lab).observe(0.0)
            else:  # one observation per token, the gap shared among the tokens that came together
                gap = (now - self.last[i]) / n_new
                hist = c.itl.labels(**lab)
                for _ in range(n_new):
                    hist.observe(gap)
            self.last[i] = now
            c.generation_tokens.labels(**lab).inc(n_new)
            c._generated(now, n_new)
        queue_time = getattr(out, "queue_time", None)
        if queue_time is not None and not self.queued[i]:
            self.queued[i] = True
            c.queue_time.labels(**lab).observe(queue_time)
        if out.finished and not self.done[i]:
            self.done[i] = True
            if not self.counted_prompt[i]:
                self._count_prompt(i, out)
            reason = out.finish_reason or "unknown"
            c.num_requests.labels(**lab, finish_reason=reason).inc()
            if reason == "abort":
                c.num_aborted.labels(**lab).inc()
            c.e2e.labels(**lab).observe(now - self.start)
        elif out.prompt_tokens and not self.counted_prompt[i]:
            self._count_prompt(i, out)

    def _count_prompt(self, i: int, out) -> None:
        self.counted_prompt[i] = True
        c, lab = self.c, self.c.labels
        c.prompt_tokens.labels(**lab).inc(out.prompt_tokens)
        c._prompt_sum += out.prompt_tokens
        if out.cached_tokens:
            c.cached_tokens.labels(**lab).inc(out.cached_tokens)
            c._cached_sum += out.cached_tokens

    def close(self) -> None:
        """The HTTP request ended: engine requests that never finished were aborted (client gone, error)."""
        c, lab = self.c, self.c.labels
        for i, done in enumerate(self.done):
            if not done:
                self.done[i] = True
                c.num_requests.labels(**lab, finish_reason="abort").inc()
                c.num_aborted.labels(**lab).inc()
                c.e2e.labels(**lab).observe(time.monotonic() - self.start)


# ---------------------------------------------------------------------------- /metrics
LEGACY_GAUGES = ("total_pages", "free_pages", "cached_pages", "running", "waiting", "page_size", "total_preemptions")


def legacy_lines(stats: dict, engine) -> list[str]:
    """ember's own gauges (KV pages, requests; per data-parallel replica too), kept for existing dashboards."""
    lines = []
    for key in LEGACY_GAUGES:
        if isinstance(stats.get(key), (int, float)):
            lines += [f"# TYPE ember_{key} gauge", f"ember_{key} {stats[key]}"]
            for i, replica in enumerate(stats.get("replicas", ())):
                if isinstance(replica.get(key), (int, float)):
                    lines.append(f'ember_{key}{{dp_rank="{i}"}} {replica[key]}')
    lines += ["# TYPE ember_outstanding_requests gauge", f"ember_outstanding_requests {engine.num_outstanding}",
              "# TYPE ember_aborted_requests_total counter",
              f"ember_aborted_requests_total {getattr(engine, 'aborts_sent', 0)}"]
    return lines


@router.get("/metrics")
async def metrics(request: Request):
    state = request.app.state.ember
    stats = await engine_stats(state)
    collector: MetricsCollector = state.engine.metrics
    collector.update_from_stats(stats)
    body = collector.render() + ("\n".join(legacy_lines(stats, state.engine)) + "\n").encode()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
