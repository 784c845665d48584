"""Signaling clients: how the probe gets an SDP answer and how it hangs up.

One contract, `SignalingSession` (offer -> answer, then close), and one class per
protocol: WHIP (RFC 9725) and Janus's EchoTest over its HTTP API. Errors carry words an
on-call engineer can act on: which host refused, what status and body came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from typing import Any, Protocol
from urllib.parse import urljoin

import aiohttp

from callmon.callresult import Signaling

BODY_EXCERPT = 200


class SignalingError(Exception):
    """The target could not be reached or did not answer with a usable SDP."""


class SignalingSession(Protocol):
    async def offer(self, sdp: str) -> str:
        """Send the offer; return the SDP answer."""
        ...

    async def close(self) -> None:
        """Hang up (best effort, bounded in time)."""
        ...

    @property
    def session_id(self) -> str | None:
        """Return the target's id for the call, once it has one."""
        ...


def open_session(
    kind: Signaling, url: str, http: aiohttp.ClientSession, token: str | None
) -> SignalingSession:
    if kind is Signaling.WHIP:
        return WhipSession(url, http, token)
    return JanusSession(url, http, token)


def _excerpt(body: str) -> str:
    body = " ".join(body.split())
    return body if len(body) <= BODY_EXCERPT else body[:BODY_EXCERPT] + "..."


async def _describe(exc: Exception, url: str) -> SignalingError:
    if isinstance(exc, aiohttp.ClientConnectorError):
        why = (
            "connection refused"
            if isinstance(exc.os_error, ConnectionRefusedError)
            else exc.os_error.strerror or str(exc.os_error)
        )
        return SignalingError(f"cannot connect to {exc.host}:{exc.port}: {why}")
    if isinstance(exc, asyncio.TimeoutError):
        return SignalingError(f"no answer from {url} in time")
    return SignalingError(f"{url}: {exc.__class__.__name__}: {exc}")


class WhipSession:
    """WHIP: POST the offer, 201 with the answer and a Location; DELETE it to hang up."""

    def __init__(self, url: str, http: aiohttp.ClientSession, token: str | None) -> None:
        self.url = url
        self._http = http
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.resource: str | None = None

    @property
    def session_id(self) -> str | None:
        return self.resource

    async def offer(self, sdp: str) -> str:
        headers = {**self._headers, "Content-Type": "application/sdp"}
        try:
            async with self._http.post(self.url, data=sdp, headers=headers) as response:
                body = await response.text(errors="replace")
                if response.status != 201:
                    raise SignalingError(
                        f"target answered HTTP {response.status} instead of 201: {_excerpt(body)}"
                    )
                content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
                if content_type != "application/sdp":
                    raise SignalingError(
                        f"answer has Content-Type {content_type or 'none'!r}, not application/sdp"
                    )
                location = response.headers.get("Location")
                if location:
                    self.resource = urljoin(str(response.url), location)
                return body
        except SignalingError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise await _describe(exc, self.url) from exc

    async def close(self) -> None:
        if self.resource is None:
            return
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with self._http.delete(
                self.resource, headers=self._headers, timeout=aiohttp.ClientTimeout(total=2)
            ):
                pass


class JanusSession:
    """Janus EchoTest over the HTTP API: create, attach, message with the offer, long-poll.

    The session keeps a long-poll running for the whole call: Janus ends sessions that
    have not been polled for 60 s, and the poll collects `webrtcup`, `media` and
    `slowlink` events for the record.
    """

    PLUGIN = "janus.plugin.echotest"

    def __init__(self, url: str, http: aiohttp.ClientSession, token: str | None) -> None:
        self.url = url.rstrip("/")
        self._http = http
        self._token = token
        self._session: str | None = None
        self._handle: str | None = None
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._poller: asyncio.Task[None] | None = None
        self.events: list[str] = []
        "Janus events seen, in order (`webrtcup`, `media`, `slowlink`, `hangup`...)."

    @property
    def session_id(self) -> str | None:
        if self._session is None:
            return None
        return f"{self._session}/{self._handle}" if self._handle else self._session

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "transaction": secrets.token_hex(6)}
        if self._token:
            body["token"] = self._token
        try:
            async with self._http.post(self.url + path, json=body) as response:
                text = await response.text(errors="replace")
                if response.status != 200:
                    raise SignalingError(f"Janus answered HTTP {response.status}: {_excerpt(text)}")
        except SignalingError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise await _describe(exc, self.url + path) from exc
        try:
            reply: dict[str, Any] = json.loads(text)
        except ValueError:
            raise SignalingError(f"Janus answered with non-JSON: {_excerpt(text)}") from None
        if reply.get("janus") == "error":
            error = reply.get("error", {})
            raise SignalingError(f"Janus error {error.get('code')}: {error.get('reason')}")
        return reply

    async def _poll(self) -> None:
        params = {"maxev": "1"}
        if self._token:
            params["token"] = self._token
        while True:
            try:
                async with self._http.get(
                    f"{self.url}/{self._session}",
                    params=params,
                    timeout=aiohttp.ClientTimeout(total=40),
                ) as response:
                    event = await response.json(content_type=None)
            except (TimeoutError, aiohttp.ClientError, ValueError):
                await asyncio.sleep(0.5)
                continue
            if isinstance(event, dict):
                kind = str(event.get("janus"))
                if kind != "keepalive":
                    self.events.append(kind)
                await self._events.put(event)

    async def offer(self, sdp: str) -> str:
        created = await self._post("", {"janus": "create"})
        self._session = str(created["data"]["id"])
        attached = await self._post(f"/{self._session}", {"janus": "attach", "plugin": self.PLUGIN})
        self._handle = str(attached["data"]["id"])
        self._poller = asyncio.get_running_loop().create_task(self._poll())
        await self._post(
            f"/{self._session}/{self._handle}",
            {
                "janus": "message",
                "body": {"audio": True, "video": True},
                "jsep": {"type": "offer", "sdp": sdp},
            },
        )
        while True:
            event = await self._events.get()
            jsep = event.get("jsep")
            if isinstance(jsep, dict) and jsep.get("type") == "answer":
                answer = jsep.get("sdp")
                if not isinstance(answer, str):
                    raise SignalingError("Janus jsep answer carries no SDP")
                return answer
            data = event.get("plugindata", {}).get("data", {})
            if isinstance(data, dict) and "error" in data:
                raise SignalingError(f"EchoTest refused the offer: {data['error']}")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._session is not None:
            with contextlib.suppress(SignalingError, asyncio.TimeoutError):
                await asyncio.wait_for(self._post(f"/{self._session}", {"janus": "destroy"}), 2)
