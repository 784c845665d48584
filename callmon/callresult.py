"""The `callmon.call/v1` result: the contract between probes and the monitor.

One definition, imported by both sides. It depends on the standard library only, so a
central monitor can validate results without installing aiortc or PyAV. Every duration is
in seconds, every rate in its base unit, every fraction in 0..1; `None` means "not
measured" (for example an A/V offset in a second without a chirp), never zero.

Each field is documented by the string under it; `python -m callmon.callresult` prints
those strings as the Markdown table the README carries, and a test keeps both in step.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar

SCHEMA = "callmon.call/v1"
SAMPLES_SCHEMA = "callmon.samples/v1"


class Status(enum.StrEnum):
    """Verdict on a call; the probe's exit code is the index (0, 1, 2)."""

    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"


class Phase(enum.StrEnum):
    """Where in its life a call failed."""

    OFFER = "offer"
    SIGNALING = "signaling"
    ICE = "ice"
    DTLS = "dtls"
    MEDIA = "media"
    CALL = "call"


class Signaling(enum.StrEnum):
    """How the probe reaches its target."""

    WHIP = "whip"
    JANUS = "janus"


@dataclass(kw_only=True)
class Target:
    url: str
    "Signaling URL of the target (WHIP endpoint or Janus HTTP API root)."
    signaling: Signaling = Signaling.WHIP
    "Signaling protocol: `whip` or `janus`."
    session: str | None = None
    "The target's own id for this call (WHIP resource URL, Janus session/handle), for its logs."


@dataclass(kw_only=True)
class Route:
    local_candidate: str
    "Type of the probe's candidate in the selected ICE pair: host, srflx, prflx or relay."
    remote_candidate: str
    "Type of the target's candidate in the selected pair."
    remote_address: str
    "The target's address and port in the selected pair."


@dataclass(kw_only=True)
class ProbeInfo:
    version: str
    "callmon version of the probe."
    host: str
    "Host name of the machine the probe ran on."
    region: str | None = None
    "Region the probe says it runs in (the monitor trusts the token's region instead)."


@dataclass(kw_only=True)
class Failure:
    phase: Phase
    "Phase that failed: `offer`, `signaling`, `ice`, `dtls`, `media` or `call`."
    reason: str
    "What went wrong, in words an on-call engineer can act on."


@dataclass(kw_only=True)
class Degradation:
    metric: str
    "Dotted path of the summary or phase value that crossed (e.g. `video.freezes`)."
    value: float
    "The call's value."
    threshold: float
    "The limit it crossed."
    comparison: str
    "`>` (higher is worse) or `<` (lower is worse)."


@dataclass(kw_only=True)
class Phases:
    """Connect milestones, each in seconds from the one call start instant."""

    offer_s: float | None = None
    "Local offer ready (ICE candidates gathered)."
    answer_s: float | None = None
    "Signaling answer received from the target."
    ice_s: float | None = None
    "ICE connected (a candidate pair succeeded)."
    dtls_s: float | None = None
    "DTLS handshake done: media can flow."
    first_rtp_audio_s: float | None = None
    "First audio RTP packet received."
    first_rtp_video_s: float | None = None
    "First video RTP packet received."
    first_frame_audio_s: float | None = None
    "First audio frame decoded."
    first_frame_video_s: float | None = None
    "First video frame decoded."
    connect_s: float | None = None
    "Connect time: both media decoded (the later first frame). Target 0.6 s."


@dataclass(kw_only=True)
class MediaSample:
    packets: int = 0
    "RTP packets received on first transmission in this second."
    lost: int = 0
    "Packets missing on first transmission (sequence gaps)."
    recovered: int = 0
    "Missing packets that a retransmission (RTX) brought back."
    loss: float | None = None
    "Lost on first transmission / expected, 0..1."
    jitter_s: float | None = None
    "RFC 3550 interarrival jitter computed by the probe from its own packet arrivals."
    rtcp_jitter_s: float | None = None
    "Jitter the target reports (RTCP receiver report) for the probe's outgoing stream."
    rtcp_loss: float | None = None
    "Fraction lost the target reports for the probe's outgoing stream, 0..1."
    bitrate_bps: float = 0.0
    "Received RTP payload bitrate, bits per second."
    delay_s: float | None = None
    "Round trip of this medium's content through the target (send to arrival), median."


@dataclass(kw_only=True)
class AudioSample(MediaSample):
    gaps: int = 0
    "Audio gaps over 200 ms that ended in this second."
    gap_s: float = 0.0
    "Total length of those gaps."


@dataclass(kw_only=True)
class VideoSample(MediaSample):
    frames: int = 0
    "Frames decoded in this second."
    fps: float = 0.0
    "Frames decoded per second."
    freezes: int = 0
    "Freezes (W3C rule over frames the network delivered complete) that ended in this second."
    freeze_s: float = 0.0
    "Total length of those freezes."
    gaps: int = 0
    "Intervals over 600 ms between delivered frames that ended in this second."
    recovery: int = 0
    "Times the probe's own decoder waited for a keyframe (its recovery, not the service's)."
    recovery_s: float = 0.0
    "Time spent in that recovery."


@dataclass(kw_only=True)
class Sample:
    """One second of a call."""

    t_s: float
    "End of the one-second window, seconds since media started."
    reliable: bool = True
    "False when the probe's event loop lagged in this second: rules ignore the sample."
    loop_lag_s: float = 0.0
    "Largest event-loop lag the probe saw in this second."
    rtt_s: float | None = None
    "Round-trip time from RTCP sender/receiver reports."
    av_offset_s: float | None = None
    "A/V offset, ITU-R BT.1359 sign: positive = audio ahead of video."
    mos: float | None = None
    "Estimated MOS, simplified E-model (1..4.5)."
    audio: AudioSample = field(default_factory=AudioSample)
    "Audio numbers for this second."
    video: VideoSample = field(default_factory=VideoSample)
    "Video numbers for this second."


@dataclass(kw_only=True)
class MediaSummary:
    packets: int = 0
    "RTP packets received on first transmission."
    expected: int = 0
    "Packets expected from the sequence numbers seen."
    lost: int = 0
    "Packets missing on first transmission."
    recovered: int = 0
    "Missing packets recovered by retransmission."
    loss: float | None = None
    "Lost on first transmission / expected, 0..1."
    residual_loss: float | None = None
    "Still missing after retransmissions / expected, 0..1."
    jitter_s: float | None = None
    "Median of the reliable seconds' RFC 3550 jitter."
    jitter_p90_s: float | None = None
    "90th percentile of the reliable seconds' jitter."
    rtcp_jitter_s: float | None = None
    "Median jitter the target reported for the probe's stream."
    bitrate_bps: float | None = None
    "Mean received bitrate."
    delay_s: float | None = None
    "Median round trip of this medium's content through the target."


@dataclass(kw_only=True)
class AudioSummary(MediaSummary):
    gaps: int = 0
    "Audio gaps over 200 ms."
    gap_s: float = 0.0
    "Total length of audio gaps."
    max_gap_s: float = 0.0
    "Longest audio gap."


@dataclass(kw_only=True)
class VideoSummary(MediaSummary):
    frames: int = 0
    "Frames decoded."
    fps: float | None = None
    "Mean decoded frames per second."
    freezes: int = 0
    "Freezes (W3C rule) in the frames the network delivered."
    freeze_s: float = 0.0
    "Total freeze time."
    max_freeze_s: float = 0.0
    "Longest freeze."
    gaps: int = 0
    "Intervals over 600 ms between delivered frames."
    recovery: int = 0
    "Times the probe's own decoder waited for a keyframe."
    recovery_s: float = 0.0
    "Time the probe's decoder spent recovering."
    corrupt_frames: int = 0
    "Decoded frames whose marker failed its check (picture damaged on the way)."
    keyframe_requests: int = 0
    "Keyframe requests (PLI) the probe sent."


@dataclass(kw_only=True)
class Summary:
    media_s: float = 0.0
    "Seconds of media held (from first media to hang-up)."
    rtt_s: float | None = None
    "Median RTCP round-trip time."
    rtt_p90_s: float | None = None
    "90th percentile RTT over reliable seconds."
    av_offset_s: float | None = None
    "Median A/V offset (positive = audio ahead)."
    av_offset_min_s: float | None = None
    "Smallest A/V offset seen."
    av_offset_max_s: float | None = None
    "Largest A/V offset seen."
    av_offset_samples: int = 0
    "Number of A/V offset measurements (one per chirp paired with a frame)."
    mos: float | None = None
    "Median estimated MOS."
    mos_p10: float | None = None
    "10th percentile MOS over reliable seconds."
    unreliable_s: int = 0
    "Seconds marked unreliable because the probe itself was overloaded."
    loop_lag_max_s: float = 0.0
    "Largest event-loop lag over the call."
    audio: AudioSummary = field(default_factory=AudioSummary)
    "Audio over the call."
    video: VideoSummary = field(default_factory=VideoSummary)
    "Video over the call."


@dataclass(kw_only=True)
class Thresholds:
    """Limits that make a call `degraded`; defaults from the field (measurements.md)."""

    connect_s: float = 0.6
    "Connect time above this degrades (the user's 600 ms target)."
    jitter_s: float = 0.030
    "Per-medium jitter (90th percentile of seconds) above this degrades (Twilio: 30 ms)."
    loss: float = 0.03
    "Per-medium loss on first transmission above this degrades (Twilio: 3 %)."
    rtt_s: float = 0.400
    "RTT (90th percentile of seconds) above this degrades (Twilio: 400 ms)."
    av_ahead_s: float = 0.090
    "Audio ahead of video by more than this degrades (BT.1359 acceptability: +90 ms)."
    av_behind_s: float = 0.185
    "Audio behind video by more than this degrades (BT.1359 acceptability: -185 ms)."
    freezes: int = 0
    "More video freezes than this degrades."
    audio_gaps: int = 0
    "More audio gaps than this degrades."
    mos: float = 3.5
    "MOS (10th percentile of seconds) below this degrades."


class _Document:
    """What both documents share: a schema id, and conversion from and to parsed JSON."""

    SCHEMA_ID: ClassVar[str]
    schema: str

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        plain = _to_plain(self)
        assert isinstance(plain, dict)
        return plain

    @classmethod
    def from_dict(cls, data: object, path: str = "") -> Self:
        """Build the document from parsed JSON, raising ContractError naming the bad field."""
        document = _from_plain(cls, data, path)
        _check_schema(document.schema, cls.SCHEMA_ID, path)
        return document

    @classmethod
    def check(cls, data: object, path: str = "") -> None:
        """Validate parsed JSON as `from_dict` does, without building the objects."""
        _check_plain(cls, data, path)
        found = typing.cast(dict[str, Any], data).get("schema", cls.SCHEMA_ID)
        _check_schema(found, cls.SCHEMA_ID, path)


@dataclass(kw_only=True)
class CallResult(_Document):
    """One probe call against one target."""

    SCHEMA_ID: ClassVar[str] = SCHEMA

    schema: str = SCHEMA
    "Always `callmon.call/v1`."
    id: str
    "Unique id of this result (UUID); the monitor stores a result id once."
    started_at: str
    "Call start instant, RFC 3339 UTC."
    target: Target
    "What was called."
    probe: ProbeInfo
    "Who called."
    duration_s: float
    "Media duration the probe was asked to hold."
    status: Status
    "`ok`, `degraded` (see `degradations`) or `failed` (see `failure`)."
    failure: Failure | None = None
    "Set when status is `failed`."
    degradations: list[Degradation] = field(default_factory=list)
    "Thresholds crossed, when status is `degraded`."
    thresholds: Thresholds = field(default_factory=Thresholds)
    "Thresholds the verdict used."
    phases: Phases = field(default_factory=Phases)
    "Connect milestones."
    route: Route | None = None
    "The ICE candidate pair media took (null if ICE never connected)."
    summary: Summary = field(default_factory=Summary)
    "Numbers over the whole call."
    samples: list[Sample] = field(default_factory=list)
    "Per-second numbers."


@dataclass(kw_only=True)
class SampleBatch(_Document):
    """Per-second samples of a long-held (continuous) call, sent while it lasts."""

    SCHEMA_ID: ClassVar[str] = SAMPLES_SCHEMA

    schema: str = SAMPLES_SCHEMA
    "Always `callmon.samples/v1`."
    id: str
    "Unique id of this batch; the monitor stores a batch id once."
    call_id: str
    "Id of the long-held call; the same in every batch of the call."
    started_at: str
    "Call start instant, RFC 3339 UTC."
    target: Target
    "What is being called."
    probe: ProbeInfo
    "Who calls."
    samples: list[Sample] = field(default_factory=list)
    "Per-second numbers, in order; `t_s` counts from the call's media start."


def _check_schema(found: str, expected: str, path: str) -> None:
    if found != expected:
        raise ContractError(_join(path, "schema"), f"expected {expected!r}, got {found!r}")


class ContractError(ValueError):
    """A value does not fit the contract; `field` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field or '<root>'}: {message}")
        self.field = field
        self.message = message


def evaluate(phases: Phases, summary: Summary, limits: Thresholds) -> list[Degradation]:
    """Return every threshold the call crossed."""
    found: list[Degradation] = []

    def above(metric: str, value: float | None, threshold: float) -> None:
        if value is not None and value > threshold:
            found.append(
                Degradation(metric=metric, value=value, threshold=threshold, comparison=">")
            )

    def below(metric: str, value: float | None, threshold: float) -> None:
        if value is not None and value < threshold:
            found.append(
                Degradation(metric=metric, value=value, threshold=threshold, comparison="<")
            )

    above("phases.connect_s", phases.connect_s, limits.connect_s)
    for kind, media in (("audio", summary.audio), ("video", summary.video)):
        above(f"{kind}.loss", media.loss, limits.loss)
        above(f"{kind}.jitter_p90_s", media.jitter_p90_s, limits.jitter_s)
    above("rtt_p90_s", summary.rtt_p90_s, limits.rtt_s)
    above("av_offset_s", summary.av_offset_s, limits.av_ahead_s)
    below("av_offset_s", summary.av_offset_s, -limits.av_behind_s)
    above("video.freezes", summary.video.freezes, limits.freezes)
    above("audio.gaps", summary.audio.gaps, limits.audio_gaps)
    below("mos_p10", summary.mos_p10, limits.mos)
    return found


# --- conversion -------------------------------------------------------------------------

T = TypeVar("T")


def _to_plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, float):
        # Microsecond resolution is beyond what any of these numbers can claim.
        return round(value, 6)
    return value


def _from_plain(cls: type[T], data: object, path: str) -> T:
    try:
        result = _converter(cls)(data)  # type: ignore[arg-type]  # classes are hashable
    except _Invalid as exc:
        raise ContractError(exc.path(path), exc.message) from None
    return typing.cast(T, result)


def _check_plain(cls: type[Any], data: object, path: str) -> None:
    try:
        _converter(cls, build=False)(data)  # type: ignore[arg-type]  # classes are hashable
    except _Invalid as exc:
        raise ContractError(exc.path(path), exc.message) from None


class _Invalid(Exception):
    """A bad value deep in a document; each level on the way up adds its name."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.parts: list[str] = []

    def at(self, part: str) -> _Invalid:
        self.parts.append(part)
        return self

    def path(self, prefix: str) -> str:
        out = prefix
        for part in reversed(self.parts):
            out = out + part if part.startswith("[") else _join(out, part)
        return out


Converter = Callable[[object], object]


@functools.cache
def _converter(hint: object, build: bool = True) -> Converter:
    """Build (once per type) a function that checks and converts a parsed JSON value.

    Compiled once, so validating a result walks it once with no type introspection: the
    monitor validates every sample of every result it ingests. With `build` false it
    only checks, returning the value as it came: the monitor keeps documents as sent, so
    building their objects would be work thrown away.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner_hint,) = [a for a in args if a is not type(None)]
        inner = _converter(inner_hint, build)
        return lambda value: None if value is None else inner(value)
    if origin is list:
        item = _converter(args[0], build)

        def convert_list(value: object) -> object:
            if type(value) is not list:
                raise _Invalid("expected a list" if value is not None else "must not be null")
            out = []
            for i, element in enumerate(value):
                try:
                    out.append(item(element))
                except _Invalid as exc:
                    raise exc.at(f"[{i}]") from None
            return out if build else value

        return convert_list
    if inspect.isclass(hint) and dataclasses.is_dataclass(hint):
        return _dataclass_converter(hint, build)
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        members = {m.value: m for m in hint}
        allowed = ", ".join(str(v) for v in members)

        def convert_enum(value: object) -> object:
            try:
                return members[value]
            except (KeyError, TypeError):
                raise _Invalid(f"expected one of {allowed}") from None

        return convert_enum
    return _SCALARS[hint]  # a KeyError here is a bug in this module: an unsupported type


def _dataclass_converter(cls: type[Any], build: bool) -> Converter:
    hints = typing.get_type_hints(cls)
    plan = [
        (
            f.name,
            _converter(hints[f.name], build),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    ]
    names = frozenset(name for name, _, _ in plan)

    def convert(value: object) -> object:
        if type(value) is not dict:
            raise _Invalid("expected an object" if value is not None else "must not be null")
        for key in value:
            if key not in names:
                raise _Invalid("unknown field").at(str(key))
        values: dict[str, object] = {}
        for name, field_converter, required in plan:
            if name in value:
                try:
                    values[name] = field_converter(value[name])
                except _Invalid as exc:
                    raise exc.at(name) from None
            elif required:
                raise _Invalid("required field is missing").at(name)
        return cls(**values) if build else value

    return convert


def _boolean(value: object) -> object:
    if type(value) is not bool:
        raise _Invalid("expected true or false" if value is not None else "must not be null")
    return value


def _integer(value: object) -> object:
    kind = type(value)
    if kind is int:
        return value
    if kind is float and value.is_integer():  # type: ignore[attr-defined]  # JSON's 1.0
        return int(value)  # type: ignore[call-overload]
    raise _Invalid("expected an integer" if value is not None else "must not be null")


def _number(value: object) -> object:
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _Invalid("expected a finite number")
        return value
    if kind is int:
        return float(value)  # type: ignore[arg-type]
    raise _Invalid("expected a number" if value is not None else "must not be null")


def _string(value: object) -> object:
    if type(value) is not str:
        raise _Invalid("expected a string" if value is not None else "must not be null")
    return value


_SCALARS: dict[object, Converter] = {bool: _boolean, int: _integer, float: _number, str: _string}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --- documentation ----------------------------------------------------------------------

_DOCUMENTED = (
    CallResult,
    SampleBatch,
    Target,
    Route,
    ProbeInfo,
    Failure,
    Degradation,
    Thresholds,
    Phases,
    Summary,
    AudioSummary,
    VideoSummary,
    Sample,
    AudioSample,
    VideoSample,
)


def field_docs() -> dict[str, list[tuple[str, str, str]]]:
    """Return, per class, (field, type, doc) rows read from the strings under the fields."""
    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            own: dict[str, str] = {}
            for stmt, nxt in zip(node.body, [*node.body[1:], None], strict=True):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    own[stmt.target.id] = nxt.value.value
            docs[node.name] = own
    rows: dict[str, list[tuple[str, str, str]]] = {}
    for cls in _DOCUMENTED:
        hints = typing.get_type_hints(cls)
        table = []
        for f in dataclasses.fields(cls):
            owner = next(c for c in cls.__mro__ if f.name in docs.get(c.__name__, {}))
            table.append((f.name, _type_name(hints[f.name]), docs[owner.__name__][f.name]))
        rows[cls.__name__] = table
    return rows


def _type_name(hint: object) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        return "string"
    if hint is float:
        return "number"
    if hint is int:
        return "integer"
    if hint is bool:
        return "boolean"
    if hint is str:
        return "string"
    return getattr(hint, "__name__", str(hint))


def markdown() -> str:
    """Return the contract as Markdown tables, one per object."""
    out: list[str] = []
    for name, table in field_docs().items():
        out.append(f"#### `{name}`\n")
        out.append("| field | type | meaning |")
        out.append("|---|---|---|")
        out.extend(f"| `{f}` | {t} | {d} |" for f, t, d in table)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
