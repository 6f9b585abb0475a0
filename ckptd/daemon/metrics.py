"""Optional Prometheus metrics (``[metrics] listen = "127.0.0.1:9464"``; off by default).

Names follow Prometheus conventions (``_seconds``, ``_bytes``, ``_total``). When metrics are off, or
``prometheus-client`` is not installed, :class:`Metrics` methods do nothing.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ckptd.daemon.metrics")

_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The daemon's metrics; every method is cheap and safe to call from the loop thread."""

    def __init__(self, listen: str = "") -> None:
        self.enabled = False
        self.port = 0
        if not listen:
            return
        try:
            import prometheus_client as prom
        except ImportError:
            log.warning("metrics.listen is set but prometheus-client is not installed; metrics off")
            return
        registry = prom.CollectorRegistry()
        self._m: dict[str, Any] = {
            "stall": prom.Histogram(
                "ckptd_snapshot_stall_seconds",
                "Time the trainer was blocked in snapshot()",
                ["job"],
                buckets=_BUCKETS_S,
                registry=registry,
            ),
            "persist": prom.Histogram(
                "ckptd_persist_seconds",
                "Accepted -> committed, per snapshot",
                ["job"],
                buckets=_BUCKETS_S,
                registry=registry,
            ),
            "raw": prom.Counter(
                "ckptd_raw_bytes_total",
                "Bytes of tensor data handed over",
                ["job"],
                registry=registry,
            ),
            "written": prom.Counter(
                "ckptd_written_bytes_total",
                "Bytes written to disk (after dedup and encoding)",
                ["job"],
                registry=registry,
            ),
            "commits": prom.Counter(
                "ckptd_commits_total", "Checkpoints committed", ["job"], registry=registry
            ),
            "failures": prom.Counter(
                "ckptd_failures_total",
                "Snapshots that failed or were refused, by reason",
                ["job", "reason"],
                registry=registry,
            ),
            "skipped": prom.Counter(
                "ckptd_skipped_snapshots_total",
                "Snapshots a client dropped (no free slot)",
                ["job"],
                registry=registry,
            ),
            "blocked": prom.Counter(
                "ckptd_blocked_snapshots_total",
                "Snapshots that waited for a free slot (on_full=block)",
                ["job"],
                registry=registry,
            ),
            "blocked_s": prom.Counter(
                "ckptd_blocked_seconds_total",
                "Seconds snapshots waited for a free slot",
                ["job"],
                registry=registry,
            ),
            "queue": prom.Gauge(
                "ckptd_queue_depth",
                "Snapshots accepted and waiting for a write to start",
                registry=registry,
            ),
            "writes": prom.Gauge(
                "ckptd_writes_in_progress",
                "Snapshots being written now (at most store.concurrent_jobs)",
                registry=registry,
            ),
            "last": prom.Gauge(
                "ckptd_last_commit_timestamp_seconds",
                "Unix time of the last commit",
                ["job"],
                registry=registry,
            ),
            "tier_backlog": prom.Gauge(
                "ckptd_tier_backlog",
                "Committed checkpoints (or rank parts) the object-store tier does not hold yet",
                registry=registry,
            ),
            "tier_bytes": prom.Counter(
                "ckptd_tier_uploaded_bytes_total",
                "Bytes uploaded to the object-store tier",
                ["job"],
                registry=registry,
            ),
            "tier_uploads": prom.Counter(
                "ckptd_tier_uploads_total",
                "Checkpoints (or rank parts) the object-store tier received",
                ["job"],
                registry=registry,
            ),
            "tier_errors": prom.Counter(
                "ckptd_tier_errors_total",
                "Failed upload attempts (retried with backoff unless permanent)",
                ["job", "reason"],
                registry=registry,
            ),
        }
        host, _, port = listen.rpartition(":")
        server, _thread = prom.start_http_server(int(port), addr=host, registry=registry)
        self.port = server.server_port
        self.enabled = True
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def committed(self, job: str, raw: int, written: int, persist_s: float, at: float) -> None:
        if self.enabled:
            self._m["commits"].labels(job).inc()
            self._m["raw"].labels(job).inc(raw)
            self._m["written"].labels(job).inc(written)
            self._m["persist"].labels(job).observe(persist_s)
            self._m["last"].labels(job).set(at)

    def failed(self, job: str, reason: str) -> None:
        if self.enabled:
            self._m["failures"].labels(job, reason).inc()

    def skipped(self, job: str) -> None:
        if self.enabled:
            self._m["skipped"].labels(job).inc()

    def blocked(self, job: str, seconds: float) -> None:
        if self.enabled:
            self._m["blocked"].labels(job).inc()
            self._m["blocked_s"].labels(job).inc(seconds)

    def stall(self, job: str, seconds: float) -> None:
        if self.enabled:
            self._m["stall"].labels(job).observe(seconds)

    def queue_depth(self, depth: int) -> None:
        if self.enabled:
            self._m["queue"].set(depth)

    def writes_in_progress(self, count: int) -> None:
        if self.enabled:
            self._m["writes"].set(count)

    def tier_backlog(self, depth: int) -> None:
        if self.enabled:
            self._m["tier_backlog"].set(depth)

    def tier_uploaded(self, job: str, nbytes: int) -> None:
        if self.enabled:
            self._m["tier_uploads"].labels(job).inc()
            self._m["tier_bytes"].labels(job).inc(nbytes)

    def tier_error(self, job: str, reason: str) -> None:
        if self.enabled:
            self._m["tier_errors"].labels(job, reason).inc()
