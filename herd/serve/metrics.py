"""Prometheus metrics of one server (its own registry, so several apps can live in one process), and the ASGI
wrapper that counts every HTTP request by endpoint and status. It knows nothing of models or requests' contents."""
from __future__ import annotations

class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = Counter("herd_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("herd_prompt_tokens", "prompt tokens admitted", ["model"], registry=r)
        self.generation_tokens = Counter("herd_generation_tokens", "tokens generated", ["model"], registry=r)
        self.prefix_hit_tokens = Counter("herd_prefix_cache_hit_tokens", "prompt tokens whose keys and values came "
                                         "from the prefix cache instead of a prefill", ["model"], registry=r)
        self.finished = Counter("herd_finished_requests", "sequences ended, by why: stop, length, tool_calls, "
                                "cancelled (the client went away), error", ["model", "reason"], registry=r)
        self.queue_depth = Gauge("herd_queue_depth", "requests waiting for a batch slot", ["model"], registry=r)
        self.running = Gauge("herd_running_requests", "requests in the running batch", ["model"], registry=r)
        self.batch_size = Histogram("herd_batch_size", "requests advanced together per engine step", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "request arrival to its first token", ["model"],
                              buckets=lat, registry=r)
        self.itl = Histogram("herd_inter_token_latency_seconds", "time between a request's successive tokens",
                             ["model"], buckets=lat, registry=r)
        self.latency = Histogram("herd_request_latency_seconds", "request arrival to its last token",
                                 ["model", "endpoint"], buckets=lat, registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class CountRequests:
    """Counts each HTTP request by path (the known endpoints, else "other") and status: a plain ASGI wrapper, so
    it does not buffer streamed bodies. A request that fails before answering counts as 500."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in self.endpoints else "other", str(status)).inc()
