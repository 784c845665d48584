"""The monitor's Prometheus metrics, on an explicit registry.

Per target and region: connect-phase durations (histogram, `phase` label), the last
call's success, jitter, loss, RTT, A/V offset, MOS, freezes and the time of the last
result. Per severity: open incidents, time to acknowledge and to resolve (histograms),
SLA breaches by kind. Notifications by channel and outcome; ingest counters. Labels stay
bounded: targets and regions come from configuration, never call ids.

Gauges of the latest values and of open incidents are read at scrape time from state
kept here, restored from the store at start, so a restart does not blank them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from callmon.times import iso_or_none as iso
from monitor.incidents import Incident, Severity
from monitor.rules import has_media, value_at

if TYPE_CHECKING:
    from monitor.pipeline import Item
    from monitor.store import ResultRow, Unit

# First packet and first frame are a millisecond apart for the probe: the frames say more.
PHASES = (
    "offer",
    "answer",
    "ice",
    "dtls",
    "first_frame_audio",
    "first_frame_video",
    "connect",
)
# Few buckets on purpose: with a thousand target x region pairs each bucket is a thousand
# series; these still bracket the 600 ms target finely.
PHASE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 1.0, 2.0, 5.0)
FREEZE_WINDOW = 60
"Seconds over which the matrix's freeze ratio is taken."
RESPONSE_BUCKETS = (60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)

# latest-value gauges: (metric name, help, path in a sample or result, per medium?)
_LATEST: tuple[tuple[str, str, str, bool], ...] = (
    ("callmon_jitter_seconds", "RFC 3550 jitter of the latest reliable second.", "jitter_s", True),
    ("callmon_loss_ratio", "Loss on first transmission in the latest second.", "loss", True),
    ("callmon_rtt_seconds", "RTCP round-trip time of the latest second.", "rtt_s", False),
    (
        "callmon_av_offset_seconds",
        "A/V offset of the latest measurement; positive = audio ahead.",
        "av_offset_s",
        False,
    ),
    ("callmon_mos", "Estimated MOS of the latest second (1..4.5).", "mos", False),
)
_LATEST_PATHS = tuple(
    (name, media, f"{media}.{path}" if media else path)
    for name, _, path, per_medium in _LATEST
    for media in (("audio", "video") if per_medium else ("",))
)
"Each gauge's (name, media label, path in a sample)."


class _Latest(Collector):
    """Gauges read at scrape time from the latest values and the open incidents."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str, str], float] = {}
        "(metric, target, region, media) -> value; media is '' for call-wide values."
        self.success: dict[tuple[str, str], float] = {}
        self.last_result: dict[tuple[str, str], float] = {}
        self.connect: dict[tuple[str, str], float] = {}
        self.frozen: dict[tuple[str, str], deque[float]] = {}
        "Per pair, the freeze seconds of its last FREEZE_WINDOW reliable seconds."
        self.open: dict[Severity, int] = dict.fromkeys(Severity, 0)

    def collect(self) -> Iterator[Metric]:
        for name, help_text, _, per_medium in _LATEST:
            labels = ["target", "region", *(["media"] if per_medium else [])]
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for (metric, target, region, media), value in sorted(self.values.items()):
                if metric == name:
                    family.add_metric([target, region, *([media] if per_medium else [])], value)
            yield family
        success = GaugeMetricFamily(
            "callmon_call_success",
            "1 if the latest call was ok or degraded, 0 if it failed.",
            labels=["target", "region"],
        )
        for (target, region), value in sorted(self.success.items()):
            success.add_metric([target, region], value)
        yield success
        last = GaugeMetricFamily(
            "callmon_last_result_timestamp_seconds",
            "When the latest result for a target and region was received (Unix time).",
            labels=["target", "region"],
        )
        for (target, region), value in sorted(self.last_result.items()):
            last.add_metric([target, region], value)
        yield last
        open_ = GaugeMetricFamily(
            "callmon_incidents_open", "Incidents not yet resolved.", labels=["severity"]
        )
        for severity, count in self.open.items():
            open_.add_metric([severity.value], count)
        yield open_

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.latest = _Latest()
        r.register(self.latest)
        self.phases = Histogram(
            "callmon_connect_phase_seconds",
            "Time from call start to each connect milestone.",
            ["target", "region", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.calls = Counter(
            "callmon_calls",
            "Call results received, by status.",
            ["target", "region", "status"],
            registry=r,
        )
        self.freezes = Counter(
            "callmon_video_freezes",
            "Video freezes (W3C rule) seen by probes.",
            ["target", "region"],
            registry=r,
        )
        self.freeze_seconds = Counter(
            "callmon_video_freeze_seconds",
            "Total video freeze time seen by probes.",
            ["target", "region"],
            registry=r,
        )
        self.time_to_acknowledge = Histogram(
            "callmon_incident_time_to_acknowledge_seconds",
            "From opening to first acknowledgement.",
            ["severity"],
            buckets=RESPONSE_BUCKETS,
            registry=r,
        )
        self.time_to_resolve = Histogram(
            "callmon_incident_time_to_resolve_seconds",
            "From opening to resolution.",
            ["severity"],
            buckets=RESPONSE_BUCKETS,
            registry=r,
        )
        self.breaches = Counter(
            "callmon_sla_breaches",
            "Response deadlines missed, by kind (ack, resolve).",
            ["severity", "kind"],
            registry=r,
        )
        self.notifications = Counter(
            "callmon_notifications",
            "Notification deliveries, by channel and outcome.",
            ["channel", "outcome"],
            registry=r,
        )
        self.ingest_requests = Counter(
            "callmon_ingest_requests",
            "Ingest requests, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.ingest_results = Counter("callmon_ingest_results", "Call results stored.", registry=r)
        self.ingest_samples = Counter(
            "callmon_ingest_samples", "Per-second samples stored.", registry=r
        )

    # --- fed by the pipeline ---------------------------------------------------------------

    def ingested(self, item: Item, region: str, samples: list[Mapping[str, Any]]) -> None:
        """Count an item and its new seconds (a second seen before is not counted again)."""
        target, body = item.target, item.body
        self.ingest_samples.inc(len(samples))
        self._latest_from(target, region, [s for s in samples if s.get("reliable", True)])
        for sample in samples:
            freezes = value_at(sample, "video.freezes") or 0
            if freezes:
                self.freezes.labels(target, region).inc(freezes)
                self.freeze_seconds.labels(target, region).inc(
                    value_at(sample, "video.freeze_s") or 0
                )
        if item.kind == "result":
            self.ingest_results.inc()
            self._result(target, region, body)
        elif has_media(samples):
            # a long-held call reports its status when it ends: its seconds with media
            # say it works now (as the call_failed rule reads them too)
            self.latest.success[(target, region)] = 1.0

    def _result(self, target: str, region: str, body: Mapping[str, Any]) -> None:
        connect = value_at(body, "phases.connect_s")
        if isinstance(connect, int | float):
            self.latest.connect[(target, region)] = float(connect)
        status = str(body.get("status"))
        self.calls.labels(target, region, status).inc()
        self.latest.success[(target, region)] = 0.0 if status == "failed" else 1.0
        phases = body.get("phases", {})
        for phase in PHASES:
            value = phases.get(f"{phase}_s")
            if isinstance(value, int | float):
                self.phases.labels(target, region, phase).observe(value)

    def _latest_from(self, target: str, region: str, samples: list[Mapping[str, Any]]) -> None:
        """Take each gauge's latest value from reliable seconds, oldest first."""
        frozen = self.latest.frozen.setdefault((target, region), deque(maxlen=FREEZE_WINDOW))
        frozen.extend(float(value_at(s, "video.freeze_s") or 0.0) for s in samples)
        # newest first: a gauge is done at the first second that has its value
        pending = _LATEST_PATHS
        for sample in reversed(samples):
            missing = []
            for name, media, path in pending:
                value = value_at(sample, path)
                if isinstance(value, int | float):
                    self.latest.values[(name, target, region, media)] = float(value)
                else:
                    missing.append((name, media, path))
            pending = tuple(missing)
            if not pending:
                break

    def committed(self, unit: Unit, all_incidents: Iterable[Incident]) -> None:
        for row in unit.results:
            self.latest.last_result[(row.target, row.region)] = row.received_at
        for change in unit.changes:
            severity = change.incident.severity.value
            for event in change.events:
                data = event.data
                if "time_to_acknowledge_s" in data:
                    self.time_to_acknowledge.labels(severity).observe(data["time_to_acknowledge_s"])
                if event.kind == "resolved":
                    self.time_to_resolve.labels(severity).observe(data["time_to_resolve_s"])
                if event.kind in ("ack_breached", "resolve_breached"):
                    self.breaches.labels(severity, data["kind"]).inc()
        self._count_open(all_incidents)

    def restore(self, latest: Iterable[ResultRow], all_incidents: Iterable[Incident]) -> None:
        """Rebuild the gauges from the store after a start."""
        for row in latest:
            self.latest.last_result[(row.target, row.region)] = row.received_at
            connect = value_at(row.body, "phases.connect_s")
            if isinstance(connect, int | float):
                self.latest.connect[(row.target, row.region)] = float(connect)
            self.latest.success[(row.target, row.region)] = 0.0 if row.status == "failed" else 1.0
            for sample in row.body.get("samples", []):
                if sample.get("reliable", True):
                    self._latest_from(row.target, row.region, sample)
        self._count_open(all_incidents)

    def matrix(self, now: float) -> list[dict[str, Any]]:
        """Return the latest numbers of every target x region pair seen."""
        latest = self.latest
        pairs = sorted(set(latest.last_result) | set(latest.frozen))
        cells = []
        for target, region in pairs:
            values = {
                (name, media): value
                for (name, t, r, media), value in latest.values.items()
                if (t, r) == (target, region)
            }
            frozen = latest.frozen.get((target, region), deque())
            last = latest.last_result.get((target, region))
            cells.append(
                {
                    "target": target,
                    "region": region,
                    "connect_s": latest.connect.get((target, region)),
                    "jitter_audio_s": values.get(("callmon_jitter_seconds", "audio")),
                    "jitter_video_s": values.get(("callmon_jitter_seconds", "video")),
                    "loss_audio": values.get(("callmon_loss_ratio", "audio")),
                    "loss_video": values.get(("callmon_loss_ratio", "video")),
                    "rtt_s": values.get(("callmon_rtt_seconds", "")),
                    "av_offset_s": values.get(("callmon_av_offset_seconds", "")),
                    "mos": values.get(("callmon_mos", "")),
                    "freeze_ratio": (sum(frozen) / len(frozen)) if frozen else None,
                    "last_result_at": iso(last),
                    "last_result_age_s": None if last is None else max(0.0, now - last),
                    "success": latest.success.get((target, region)),
                }
            )
        return cells

    def _count_open(self, all_incidents: Iterable[Incident]) -> None:
        counts = dict.fromkeys(Severity, 0)
        for incident in all_incidents:
            if incident.open:
                counts[incident.severity] += 1
        self.latest.open = counts


async def serve_metrics(request: web.Request, registry: CollectorRegistry) -> web.Response:
    """Expose a registry, building the text in a worker thread.

    With a thousand target x region pairs the exposition takes long enough to stall
    ingest if built on the event loop.
    """
    accept = ",".join(request.headers.getall("Accept", []))
    encoder, content_type = choose_encoder(accept)
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(None, encoder, registry)
    response = web.Response(body=body, headers={"Content-Type": content_type})
    response.enable_compression()
    return response
