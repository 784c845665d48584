"""Who is calling: probes and operators, by bearer token (stored as SHA-256 digests).

A probe token identifies the probe and its region, so nothing a probe sends can claim
another identity. Operators act on incidents. Each role is refused the other's routes
with 403; an unknown or missing token is a 401.

The web UI signs an operator in once with the token and then holds a session cookie
(HttpOnly, SameSite=Strict). A write made with the cookie must also carry the
`X-Callmon-Request` header, which a page of another site cannot add: no cross-site forgery.
Sessions live in memory: a restart signs everyone out, which costs one sign-in.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

from monitor.config import MonitorConfig, OperatorIdentity, ProbeIdentity, token_digest
from monitor.errors import error

SESSION_COOKIE = "callmon_session"
SESSION_S = 12 * 3600.0
CSRF_HEADER = "X-Callmon-Request"


@dataclass(frozen=True)
class Tokens:
    probes: dict[str, ProbeIdentity]
    operators: dict[str, OperatorIdentity]
    sessions: dict[str, tuple[OperatorIdentity, float]] = field(default_factory=dict)
    "Session id -> (operator, expiry, monotonic)."

    def sign_in(self, token: str) -> tuple[OperatorIdentity, str] | None:
        """Open a session for an operator token; None if it is not one."""
        digest = token_digest(token.strip())
        operator = next(
            (o for known, o in self.operators.items() if hmac.compare_digest(known, digest)),
            None,
        )
        if operator is None:
            return None
        session = secrets.token_urlsafe(32)
        now = time.monotonic()
        for stale in [s for s, (_, until) in self.sessions.items() if until < now]:
            del self.sessions[stale]
        self.sessions[session] = (operator, now + SESSION_S)
        return operator, session

    def sign_out(self, request: web.Request) -> None:
        self.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)

    def _session(self, request: web.Request) -> OperatorIdentity | None:
        entry = self.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if entry is None or entry[1] < time.monotonic():
            return None
        if request.method not in ("GET", "HEAD") and CSRF_HEADER not in request.headers:
            raise forbidden(f"a write with the session cookie needs the {CSRF_HEADER} header")
        return entry[0]

    @classmethod
    def from_config(cls, config: MonitorConfig) -> Tokens:
        return cls(
            probes={p.token_sha256: p for p in config.probes},
            operators={o.token_sha256: o for o in config.operators},
        )

    def who(self, request: web.Request) -> ProbeIdentity | OperatorIdentity:
        """Return the caller's identity or raise 401."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            session = self._session(request)
            if session is not None:
                return session
            raise unauthorized("a bearer token is required")
        digest = token_digest(token.strip())
        # compare against every digest so timing does not tell which prefix matched
        found: ProbeIdentity | OperatorIdentity | None = None
        for known, probe in self.probes.items():
            if hmac.compare_digest(known, digest):
                found = probe
        for known, operator in self.operators.items():
            if hmac.compare_digest(known, digest):
                found = operator
        if found is None:
            raise unauthorized("unknown token")
        return found

    def probe(self, request: web.Request) -> ProbeIdentity:
        identity = self.who(request)
        if not isinstance(identity, ProbeIdentity):
            raise forbidden("this route takes a probe token")
        return identity

    def reader(self, request: web.Request, anonymous: bool) -> OperatorIdentity | None:
        """Allow an operator, or anyone when anonymous reading is on (then None)."""
        if anonymous and "Authorization" not in request.headers:
            # a cookie of a session that no longer exists (a restart) reads anonymously
            entry = self.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
            if entry is None or entry[1] < time.monotonic():
                return None
        return self.operator(request)

    def operator(self, request: web.Request) -> OperatorIdentity:
        identity = self.who(request)
        if not isinstance(identity, OperatorIdentity):
            raise forbidden("this route takes an operator token")
        return identity


def unauthorized(reason: str) -> web.HTTPException:
    return error(web.HTTPUnauthorized, reason, **{"WWW-Authenticate": 'Bearer realm="callmon"'})


def forbidden(reason: str) -> web.HTTPException:
    return error(web.HTTPForbidden, reason)
