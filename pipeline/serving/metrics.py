"""Prometheus metrics of the service (``GET /metrics``), one registry per app.

- ``mnist_http_requests_total{route,method,status}`` and
  ``mnist_http_request_duration_seconds{route,method,status}`` (histogram): every HTTP
  request; ``route`` is the route template (``/v1/predict``), ``unmatched`` for
  unknown paths (bounded label values); status ``499`` = client went away first;
- ``mnist_http_requests_in_flight``: requests being handled now;
- ``mnist_requests_shed_total{reason}``: 503s from the admission and work-slot limits;
- ``mnist_model_info{sha256,version,provider}`` = 1 for the model being served;
  ``mnist_model_loaded``, ``mnist_model_file_missing`` (0/1);
- ``mnist_model_reloads_total{result="ok"|"failed"}``: hot swaps and refused files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.serving.model_store import ModelStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Single-image inference is ~1 ms; decodes and big batches reach seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _ModelCollector(Collector):
    """Reads the store at scrape time: no bookkeeping in the reload path."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        model = self.store.current
        state = self.store.state
        info = GaugeMetricFamily(
            "mnist_model_info", "the model being served", labels=["sha256", "version", "provider"]
        )
        if model is not None:
            info.add_metric([model.sha256, model.version or "", model.provider], 1)
        yield info
        yield GaugeMetricFamily("mnist_model_loaded", "1 when a model is loaded", int(bool(model)))
        yield GaugeMetricFamily(
            "mnist_model_file_missing",
            "1 while the production model file is missing (the loaded one keeps serving)",
            int(state.missing is not None),
        )
        reloads = CounterMetricFamily(
            "mnist_model_reloads", "model loads by result", labels=["result"]
        )
        reloads.add_metric(["ok"], state.reloads)
        reloads.add_metric(["failed"], state.failed_reloads)
        yield reloads


class Metrics:
    def __init__(self, store: ModelStore) -> None:
        self.registry = CollectorRegistry()
        labels = ["route", "method", "status"]
        self.requests = Counter(
            "mnist_http_requests", "HTTP requests", labels, registry=self.registry
        )
        self.latency = Histogram(
            "mnist_http_request_duration_seconds",
            "HTTP request latency",
            labels,
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "mnist_http_requests_in_flight", "requests being handled", registry=self.registry
        )
        self.shed = Counter(
            "mnist_requests_shed", "503s from load limits", ["reason"], registry=self.registry
        )
        self.registry.register(_ModelCollector(store))
        # Route templates of the app (set by create_app): a request refused before routing
        # (401, 503, 413) is still labelled by its path when that path is a route.
        self.route_paths: frozenset[str] = frozenset()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Outermost: times every HTTP request and counts it by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499  # nothing sent: the client went away (or the app failed; see finally)
        start = time.perf_counter()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                path = scope.get("path", "")
                route = path if path in self.metrics.route_paths else "unmatched"
            labels = (route, scope.get("method", ""), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
