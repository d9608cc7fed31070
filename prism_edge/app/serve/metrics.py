"""GET /metrics: the server's and the cluster's numbers in Prometheus' text format (prometheus_client).

Each server has its own registry (two servers in one process, as in the tests, never share counters).

  prism_requests_total{route,status}           requests answered, by route and HTTP status
  prism_request_seconds{route}                 whole-request latency (histogram)
  prism_queue_seconds{route}                   admitted until the cluster took it (histogram)
  prism_prefill_seconds / prism_time_to_first_token_seconds / prism_time_per_output_token_seconds   generations
  prism_tokens_total{kind}                     prompt and completion tokens
  prism_batch_requests / prism_batch_sequences  requests and sequences per run batch (histograms)
  prism_exchange_bytes_total{device,direction}  bytes each device sent and received between layers (from the
                                                tensors sent: the requests' Stats)
  prism_stage_bytes_total{device}               hidden rows a device handed to the next pipeline stage
  prism_inflight_requests                       admitted and not yet answered
  prism_device_up{device}                       1 while the cluster has every device, 0 once one is lost
  prism_cluster_requests                        requests the cluster ran (a batch counts once)
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ...runtime.stats import Stats

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SIZES = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The collectors of one server."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        r = self.registry = CollectorRegistry()
        self.requests = Counter("prism_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("prism_request_seconds", "whole-request latency", ["route"], buckets=LATENCY,
                                 registry=r)
        self.queue = Histogram("prism_queue_seconds", "admitted until the cluster took the request", ["route"],
                               buckets=LATENCY, registry=r)
        self.prefill = Histogram("prism_prefill_seconds", "a generation's prefill across the devices",
                                 buckets=LATENCY, registry=r)
        self.first_token = Histogram("prism_time_to_first_token_seconds", "admitted until the first new token",
                                     buckets=LATENCY, registry=r)
        self.per_token = Histogram("prism_time_per_output_token_seconds", "between new tokens after the first",
                                   buckets=TOKEN, registry=r)
        self.tokens = Counter("prism_tokens", "tokens processed", ["kind"], registry=r)
        self.batch_requests = Histogram("prism_batch_requests", "requests per batch run", buckets=SIZES, registry=r)
        self.batch_rows = Histogram("prism_batch_sequences", "sequences per batch run", buckets=SIZES, registry=r)
        self.exchange = Counter("prism_exchange_bytes", "bytes between layers, counted from the tensors sent",
                                ["device", "direction"], registry=r)
        self.stage = Counter("prism_stage_bytes", "hidden rows handed to the next pipeline stage", ["device"],
                             registry=r)
        self.inflight = Gauge("prism_inflight_requests", "admitted and not yet answered", registry=r)
        self.up = Gauge("prism_device_up", "1 while the cluster has every device", ["device"], registry=r)
        self.ran = Gauge("prism_cluster_requests", "requests the cluster ran (a batch once)", registry=r)

    def observe_stats(self, stats: Stats | None) -> None:
        """A request's (or batch's) bytes, per device, as the devices counted them."""
        if stats is None:
            return
        for p in range(stats.world):
            self.exchange.labels(str(p), "sent").inc(stats.bytes_sent(p))
            self.exchange.labels(str(p), "received").inc(stats.bytes_received(p))
            if stats.stage_sent is not None and p < len(stats.stage_sent):
                self.stage.labels(str(p)).inc(stats.stage_sent[p])

    def render(self) -> bytes:
        alive = 1 if self.cluster.alive else 0
        for p in range(self.cluster.world):
            self.up.labels(str(p)).set(alive)
        self.ran.set(self.cluster.requests)
        return generate_latest(self.registry)
