"""Prometheus metrics of one server, labelled by model and version, in a registry of its own (two servers in
one process, as in the tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kiln_requests", "Inference requests by outcome (ok, bad_request, overloaded, "
                                "unavailable, error)", ["model", "version", "outcome"], registry=r)
        self.latency = Histogram("kiln_request_latency_seconds", "Time from request body read to response, "
                                 "successful inference requests", ["model", "version"], buckets=LATENCY_BUCKETS_S,
                                 registry=r)
        self.queue_wait = Histogram("kiln_queue_seconds", "Time a request waited in its batch queue plus its "
                                    "batch's run", ["model", "version"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_rows = Histogram("kiln_batch_size", "Rows in each executed batch (before padding)",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.padded_rows = Counter("kiln_batch_padding_rows", "Rows of zeros added to reach a compiled bucket",
                                   ["model", "version"], registry=r)
        self.compute = Histogram("kiln_compute_seconds", "Model run time of each executed batch",
                                 ["model", "version"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("kiln_queue_depth", "Requests waiting in the batch queue", ["model", "version"],
                                 registry=r)
        self.loads = Counter("kiln_model_loads", "Version loads by result (ok, failed)",
                             ["model", "version", "result"], registry=r)
        self.ready = Gauge("kiln_version_serving", "1 while a version serves traffic", ["model", "version"],
                           registry=r)

    def batch_observer(self, model: str, version: str):
        rows_h, pad_c, compute_h = (self.batch_rows.labels(model, version), self.padded_rows.labels(model, version),
                                    self.compute.labels(model, version))

        def on_batch(rows: int, bucket: int, seconds: float) -> None:
            rows_h.observe(rows)
            pad_c.inc(bucket - rows)
            compute_h.observe(seconds)

        return on_batch

    def depth_observer(self, model: str, version: str):
        return self.queue_depth.labels(model, version).set

    def render(self) -> bytes:
        return generate_latest(self.registry)
