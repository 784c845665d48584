"""`callmon reflector`: a WHIP endpoint (RFC 9725) that echoes what it receives.

POST an SDP offer to the endpoint (optionally with fault-injection parameters in the query
string, see reflector.impairment) and get 201 Created, the SDP answer and a Location;
GET that location for what was applied; DELETE it to hang up. Limits keep one bad client
from hurting the others: concurrent calls (503), SDP size (413), malformed SDP (400 with
the reason), call duration, and an optional bearer token (401).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiortc import (
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.rtp import RtpPacket
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.aiohttp import make_aiohttp_handler

import callmon
from callmon.tasks import TaskGroup
from probes import aiortc_hooks
from probes.assembler import attach
from probes.ice import IceOptions
from probes.media import CLOCK_RATES, CODECS, prefer_codec
from reflector.forwarder import Forwarder, ForwardTrack, MediaOrigin
from reflector.impairment import Impairment, WireImpairment

log = logging.getLogger("callmon.reflector")

# A call whose ICE/DTLS has not connected by then is abandoned.
CONNECT_TIMEOUT_S = 30.0
# Records of ended calls kept for GET, newest last; the newest few with every packet.
ENDED_KEPT = 200
ENDED_WITH_PACKETS = 10


@dataclass(frozen=True, kw_only=True)
class ReflectorConfig:
    host: str = "127.0.0.1"
    "Address the HTTP listener binds to."
    port: int = 8089
    path: str = "/whip"
    "Base path of the WHIP endpoint."
    max_calls: int = 20
    "Concurrent calls; one more gets 503."
    max_sdp_bytes: int = 64 * 1024
    "Largest SDP offer accepted; larger gets 413."
    max_duration_s: float = 3600.0
    "Calls are hung up after this long."
    token: str | None = None
    "Bearer token required on every WHIP request, when set."
    cors_origin: str | None = "*"
    "Origin allowed to call the endpoint from a browser (CORS); None turns CORS off."
    ice: IceOptions = field(default_factory=IceOptions)


@dataclass(eq=False)
class Call:
    id: str
    pc: RTCPeerConnection
    impairment: Impairment
    "What is applied now: the call's own (from its URL), or the live one."
    own: bool
    "The call brought its own impairment; live changes leave it alone."
    created: float
    origin: MediaOrigin
    forwarders: dict[str, Forwarder] = field(default_factory=dict)
    wire: WireImpairment | None = None
    state: str = "connecting"
    ended_reason: str | None = None
    "deleted, expired (maximum duration), abandoned (never connected), failed, closed, shutdown"
    timer: asyncio.TimerHandle | None = None
    tasks: TaskGroup = field(default_factory=TaskGroup)

    def describe(self, *, packets: bool = False) -> dict[str, object]:
        media_started = None if self.origin.at is None else self.origin.at - self.created
        applied: dict[str, object] = {}
        for kind, forwarder in self.forwarders.items():
            entry: dict[str, object] = {"frames_forwarded": forwarder.forwarded}
            periods = [forwarder.records[k].as_dict() for k in sorted(forwarder.records)]
            if periods:
                entry["blackout"] = periods[0]
                entry["blackouts"] = periods
            applied[kind] = entry
        if self.wire is not None:
            for kind, wire in self.wire.report(packets=packets).items():
                applied.setdefault(kind, {}).update(wire)  # type: ignore[attr-defined]
        return {
            "id": self.id,
            "state": self.state,
            "ended_reason": self.ended_reason,
            "age_s": time.monotonic() - self.created,
            "media_started_s": media_started,
            "impairment": self.impairment.as_dict(),
            "applied": applied,
        }


@dataclass
class Registry:
    """Calls by id: live ones, and the last ENDED_KEPT ended ones for GET."""

    live: dict[str, Call] = field(default_factory=dict)
    ended: OrderedDict[str, Call] = field(default_factory=OrderedDict)
    starting: int = 0
    "Calls whose answer is being made: they hold a slot already."
    enders: TaskGroup = field(default_factory=TaskGroup)
    "Hang-ups started by timers."

    live_impairment: Impairment | None = None
    "Set by an operator (PUT /admin/impairment) for every call without its own."
    live_since: float = 0.0
    "When it was set (monotonic): its blackouts are timed from then."
    down: bool = False
    "Playing dead: new calls get 503 and live calls were hung up."

    def get(self, call_id: str) -> Call | None:
        return self.live.get(call_id) or self.ended.get(call_id)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    calls_active: Gauge
    calls: Counter
    rejected: Counter


def _metrics() -> Metrics:
    registry = CollectorRegistry()
    return Metrics(
        registry,
        Gauge("callmon_reflector_calls_active", "Calls being echoed now.", registry=registry),
        Counter(
            "callmon_reflector_calls",
            "Calls ended, by how they ended.",
            ["reason"],
            registry=registry,
        ),
        Counter(
            "callmon_reflector_rejected_requests",
            "WHIP requests refused, by HTTP status.",
            ["status"],
            registry=registry,
        ),
    )


CONFIG = web.AppKey("config", ReflectorConfig)
CALLS = web.AppKey("calls", Registry)
METRICS = web.AppKey("metrics", Metrics)


def create_app(config: ReflectorConfig) -> web.Application:
    """Build the reflector's aiohttp application."""
    # The body limit is the SDP limit: no route takes anything bigger.
    app = web.Application(client_max_size=config.max_sdp_bytes, middlewares=[_errors])
    app[CONFIG] = config
    app[CALLS] = Registry()
    app[METRICS] = _metrics()
    base = config.path.rstrip("/")
    app.router.add_post(base, post_offer)
    app.router.add_route("OPTIONS", base, options_endpoint)
    app.router.add_route("OPTIONS", base + "/{id}", options_endpoint)
    app.router.add_get(base + "/{id}", get_call)
    app.router.add_delete(base + "/{id}", delete_call)
    app.router.add_patch(base + "/{id}", patch_call)
    app.router.add_get("/admin/impairment", get_live_impairment)
    app.router.add_put("/admin/impairment", put_live_impairment)
    app.router.add_delete("/admin/impairment", delete_live_impairment)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", make_aiohttp_handler(app[METRICS].registry))
    app.on_shutdown.append(_hang_up_all)
    return app


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count refusals and add CORS headers, so browser WHIP clients can read errors too."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and request.method == "POST":
            request.app[METRICS].rejected.labels(str(exc.status)).inc()
        _cors(request, exc.headers)
        raise
    _cors(request, response.headers)
    return response


def _cors(request: web.Request, headers: CIMultiDict[str]) -> None:
    origin = request.app[CONFIG].cors_origin
    if origin is None:
        return
    headers["Access-Control-Allow-Origin"] = origin
    headers["Access-Control-Expose-Headers"] = "Location, ETag, Accept-Post"
    if request.method == "OPTIONS":
        headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PATCH, OPTIONS"
        headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        headers["Access-Control-Max-Age"] = "600"


def _reject(status: type[web.HTTPException], reason: str, **headers: str) -> web.HTTPException:
    return status(text=reason + "\n", headers=headers)


def _authorize(request: web.Request) -> None:
    token = request.app[CONFIG].token
    if token is None:
        return
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
        raise _reject(
            web.HTTPUnauthorized,
            "a valid bearer token is required",
            **{"WWW-Authenticate": 'Bearer realm="callmon-reflector"'},
        )


async def post_offer(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    calls = request.app[CALLS]
    _authorize(request)
    if request.content_type != "application/sdp":
        raise _reject(
            web.HTTPUnsupportedMediaType,
            f"Content-Type must be application/sdp, not {request.content_type or 'none'}",
        )
    if request.content_length is not None and request.content_length > config.max_sdp_bytes:
        raise web.HTTPRequestEntityTooLarge(
            max_size=config.max_sdp_bytes,
            actual_size=request.content_length,
            text=f"SDP offer of {request.content_length} bytes exceeds {config.max_sdp_bytes}\n",
        )
    try:
        impairment = Impairment.from_query(request.query)
    except ValueError as exc:
        raise _reject(web.HTTPBadRequest, f"bad query parameter: {exc}") from None
    if calls.down:
        raise _reject(
            web.HTTPServiceUnavailable,
            "down on purpose (PUT /admin/impairment?down=1); DELETE /admin/impairment to end",
        )
    if len(calls.live) + calls.starting >= config.max_calls:
        raise _reject(
            web.HTTPServiceUnavailable,
            f"all {config.max_calls} call slots are busy",
            **{"Retry-After": "5"},
        )
    body = await request.read()  # over client_max_size: 413 from aiohttp itself
    try:
        offer = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _reject(web.HTTPBadRequest, "SDP offer is not UTF-8") from None
    if not offer.lstrip().startswith("v=0"):
        raise _reject(web.HTTPBadRequest, "body is not an SDP offer (must start with v=0)")

    own = bool(request.query)
    live = calls.live_impairment
    call = Call(
        id=secrets.token_urlsafe(12),
        pc=RTCPeerConnection(config.ice.configuration()),
        impairment=impairment if own or live is None else live,
        own=own,
        created=time.monotonic(),
        origin=MediaOrigin(),
    )
    calls.starting += 1  # the slot is taken while the answer is being made
    try:
        answer = await _answer(call, offer, config)
        impair(call, call.impairment, None if own or live is None else calls.live_since)
    except ValueError as exc:
        await call.pc.close()
        raise _reject(web.HTTPBadRequest, f"malformed SDP offer: {exc}") from None
    except BaseException:
        await call.pc.close()
        raise
    finally:
        calls.starting -= 1
    calls.live[call.id] = call
    request.app[METRICS].calls_active.set(len(calls.live))
    loop = asyncio.get_running_loop()
    call.timer = loop.call_later(config.max_duration_s, _expire, request.app, call)
    loop.call_later(CONNECT_TIMEOUT_S, _abandon_if_unconnected, request.app, call)

    @call.pc.on("connectionstatechange")
    async def on_state() -> None:
        if call.pc.connectionState == "connected":
            call.state = "connected"
        elif call.pc.connectionState in ("failed", "closed"):
            await _end(request.app, call, call.pc.connectionState)

    location = f"{config.path.rstrip('/')}/{call.id}"
    return web.Response(
        status=201,
        body=answer.encode(),
        content_type="application/sdp",
        headers={"Location": location, "ETag": f'"{call.id}"'},
    )


async def _answer(call: Call, offer: str, config: ReflectorConfig) -> str:
    """Set up forwarding for every audio/video m-line; return the SDP answer."""
    pc = call.pc
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
    except Exception as exc:  # aiortc raises many kinds on bad SDP; all mean "malformed"
        raise ValueError(f"{exc.__class__.__name__}: {exc}") from exc
    transceivers = [t for t in pc.getTransceivers() if t.kind in CODECS]
    if not transceivers:
        raise ValueError("no audio or video m-line to echo")
    streams: dict[int, tuple[str, bool]] = {}
    for transceiver in transceivers:
        prefer_codec(transceiver)
        forwarder = _forward(call, transceiver)
        call.forwarders[transceiver.kind] = forwarder
        media_ssrc, rtx_ssrc = aiortc_hooks.sender_ssrcs(transceiver.sender)
        streams[media_ssrc] = (transceiver.kind, False)
        streams[rtx_ssrc] = (transceiver.kind, True)
    with aiortc_hooks.host_addresses(config.ice.host_addresses()):
        await pc.setLocalDescription(await pc.createAnswer())
    # Always on the send path, even unimpaired: a live impairment can come at any time.
    call.wire = WireImpairment(call.impairment, streams, asyncio.get_running_loop())
    aiortc_hooks.wrap_rtp_send(aiortc_hooks.dtls_transport(pc), call.wire.wrap)
    return str(pc.localDescription.sdp)


def impair(call: Call, impairment: Impairment, epoch: float | None) -> None:
    """Apply an impairment to a call, blackouts timed from `epoch` (None: media start)."""
    call.impairment = impairment
    if call.wire is not None:
        call.wire.impairment = impairment
    for kind, forwarder in call.forwarders.items():
        forwarder.set_blackout(impairment.blackout(kind), epoch)


def _forward(call: Call, transceiver: RTCRtpTransceiver) -> Forwarder:
    kind = transceiver.kind
    track = ForwardTrack(kind)
    receiver = transceiver.receiver
    upstream: dict[str, int] = {}

    def request_keyframe() -> None:
        ssrc = upstream.get("ssrc")
        if ssrc is not None:
            call.tasks.spawn(aiortc_hooks.send_pli(receiver, ssrc))

    forwarder = Forwarder(kind, CLOCK_RATES[kind], track, call.origin, request_keyframe)

    def on_packet(packet: RtpPacket, arrival: float) -> None:
        upstream.setdefault("ssrc", packet.ssrc)

    attach(receiver, kind, forwarder.on_frame, on_packet)
    call.pc.addTrack(track)
    aiortc_hooks.on_keyframe_request(transceiver.sender, forwarder.keyframe_upstream)
    return forwarder


def _call_or_404(request: web.Request) -> Call:
    _authorize(request)
    call = request.app[CALLS].get(request.match_info["id"])
    if call is None:
        raise _reject(web.HTTPNotFound, "no such call")
    return call


async def get_call(request: web.Request) -> web.Response:
    call = _call_or_404(request)
    packets = request.query.get("packets") in ("1", "true")
    return web.json_response(call.describe(packets=packets))


async def delete_call(request: web.Request) -> web.Response:
    call = _call_or_404(request)
    await _end(request.app, call, "deleted")
    return web.Response(status=200, text="call ended\n")


async def patch_call(request: web.Request) -> web.Response:
    _call_or_404(request)
    # RFC 9725: a resource that supports neither trickle ICE nor ICE restarts says 405.
    raise web.HTTPMethodNotAllowed(
        "PATCH",
        ["GET", "DELETE"],
        text="trickle ICE and ICE restarts are not supported: send a full offer\n",
    )


def _live_json(calls: Registry) -> web.Response:
    live = calls.live_impairment
    return web.json_response(
        {
            "impairment": None if live is None else live.as_dict(),
            "down": calls.down,
            "calls_affected": sum(1 for c in calls.live.values() if not c.own),
        }
    )


async def get_live_impairment(request: web.Request) -> web.Response:
    _authorize(request)
    return _live_json(request.app[CALLS])


async def put_live_impairment(request: web.Request) -> web.Response:
    """Impair every call without its own impairment, live, from now: a game day.

    The same parameters as on the WHIP URL (blackouts timed from now and optionally
    repeating: START:DURATION:EVERY), plus `down=1` to play dead (503 to new calls,
    live calls hung up).
    """
    _authorize(request)
    calls = request.app[CALLS]
    query = dict(request.query)
    down = query.pop("down", "0")
    if down not in ("0", "1", "true", "false"):
        raise _reject(web.HTTPBadRequest, "bad query parameter: down: expected 1 or 0")
    try:
        impairment = Impairment.from_query(query)
    except ValueError as exc:
        raise _reject(web.HTTPBadRequest, f"bad query parameter: {exc}") from None
    calls.live_impairment = impairment
    calls.live_since = time.monotonic()
    calls.down = down in ("1", "true")
    for call in list(calls.live.values()):
        if calls.down:
            await _end(request.app, call, "down")
        elif not call.own:
            impair(call, impairment, calls.live_since)
    log.info("live impairment: %s%s", impairment.as_dict(), " (down)" if calls.down else "")
    return _live_json(calls)


async def delete_live_impairment(request: web.Request) -> web.Response:
    _authorize(request)
    calls = request.app[CALLS]
    calls.live_impairment = None
    calls.down = False
    for call in calls.live.values():
        if not call.own:
            impair(call, Impairment(), None)
    log.info("live impairment cleared")
    return _live_json(calls)


async def options_endpoint(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Accept-Post": "application/sdp"})


async def healthz(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return web.json_response(
        {
            "status": "ok",
            "version": callmon.__version__,
            "calls_active": len(request.app[CALLS].live),
            "max_calls": config.max_calls,
        }
    )


async def _end(app: web.Application, call: Call, reason: str) -> None:
    calls = app[CALLS]
    if calls.live.pop(call.id, None) is None:
        return
    call.state = "ended"
    call.ended_reason = reason
    if call.timer is not None:
        call.timer.cancel()
    calls.ended[call.id] = call
    while len(calls.ended) > ENDED_KEPT:
        calls.ended.popitem(last=False)
    # Per-packet records are kept for the most recent calls only; older ones keep totals.
    for old in list(calls.ended.values())[:-ENDED_WITH_PACKETS]:
        if old.wire is not None:
            old.wire.forget_packets()
    app[METRICS].calls_active.set(len(calls.live))
    app[METRICS].calls.labels(reason).inc()
    for forwarder_track in call.pc.getSenders():
        if isinstance(forwarder_track.track, ForwardTrack):
            forwarder_track.track.end()
    with contextlib.suppress(Exception):
        await call.pc.close()
    await call.tasks.close()


def _expire(app: web.Application, call: Call) -> None:
    app[CALLS].enders.spawn(_end(app, call, "expired"))


def _abandon_if_unconnected(app: web.Application, call: Call) -> None:
    if call.state == "connecting":
        app[CALLS].enders.spawn(_end(app, call, "abandoned"))


async def _hang_up_all(app: web.Application) -> None:
    for call in list(app[CALLS].live.values()):
        await _end(app, call, "shutdown")
    await app[CALLS].enders.close()


@contextlib.asynccontextmanager
async def running(config: ReflectorConfig) -> AsyncIterator[str]:
    """Serve the reflector until the block exits; yield its base URL (tests, demo)."""
    runner = web.AppRunner(create_app(config), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{config.host}:{port}{config.path.rstrip('/')}"
    finally:
        await runner.cleanup()
