"""Prometheus metrics, in a registry per app (so two apps in one process, as in tests, never collide).

Request counts and latency by route template, tokens generated, generations in flight and refused, and, read at
scrape time, jobs by status (from the database) and the messages waiting in the broker's `gpu` queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("app.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _ScrapeCollector(Collector):
    """Gauges computed when scraped; a source that fails (database or broker down) is skipped, not fatal."""

    def __init__(self, jobs_by_status: Callable[[], Mapping[str, int]], queue_depth: Callable[[], int]) -> None:
        self.jobs_by_status, self.queue_depth = jobs_by_status, queue_depth

    def describe(self) -> Iterator[Metric]:
        """The names, without reading the sources (the registry asks at registration time)."""
        yield GaugeMetricFamily("unsloth_jobs", "Fine-tuning jobs by status", labels=["status"])
        yield GaugeMetricFamily("unsloth_queue_depth", "Messages waiting in a broker queue", labels=["queue"])

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.jobs_by_status()
        except Exception as e:
            log.warning("metrics: cannot count jobs: %s", e)
        else:
            jobs = GaugeMetricFamily("unsloth_jobs", "Fine-tuning jobs by status", labels=["status"])
            for status, n in sorted(counts.items()):
                jobs.add_metric([status], n)
            yield jobs
        try:
            depth = self.queue_depth()
        except Exception as e:
            log.warning("metrics: cannot read the broker queue depth: %s", e)
        else:
            queue = GaugeMetricFamily("unsloth_queue_depth", "Messages waiting in a broker queue", labels=["queue"])
            queue.add_metric(["gpu"], depth)
            yield queue


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("unsloth_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram("unsloth_http_request_duration_seconds", "HTTP request latency (to the last byte)",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("unsloth_prompt_tokens", "Prompt tokens processed", ["kind"], registry=r)
        self.generated_tokens = Counter("unsloth_generated_tokens", "Tokens generated", ["kind"], registry=r)
        self.generations_in_flight = Gauge("unsloth_generations_in_flight", "Generations running or waiting",
                                           registry=r)
        self.generations_rejected = Counter("unsloth_generations_rejected", "Generations refused (429)", registry=r)
        self.generations_cancelled = Counter("unsloth_generations_cancelled",
                                             "Generations stopped early (client gone)", registry=r)
        self.jobs_created = Counter("unsloth_jobs_created", "Fine-tuning jobs created", registry=r)

    def add_scrape_sources(self, jobs_by_status: Callable[[], Mapping[str, int]],
                           queue_depth: Callable[[], int]) -> None:
        self.registry.register(_ScrapeCollector(jobs_by_status, queue_depth))

    def render(self) -> bytes:
        return generate_latest(self.registry)
