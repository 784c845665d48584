"""Who is calling: probes and operators, by bearer token (stored as SHA-256 digests).

A probe token identifies the probe and its region, so nothing a probe sends can claim
another identity. Operators act on incidents. Each role is refused the other's routes
with 403; an unknown or missing token is a 401.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from monitor.config import MonitorConfig, OperatorIdentity, ProbeIdentity, token_digest
from monitor.errors import error


@dataclass(frozen=True)
class Tokens:
    probes: dict[str, ProbeIdentity]
    operators: dict[str, OperatorIdentity]

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

    def operator(self, request: web.Request) -> OperatorIdentity:
        identity = self.who(request)
        if not isinstance(identity, OperatorIdentity):
            raise forbidden("this route takes an operator token")
        return identity


def unauthorized(reason: str) -> web.HTTPException:
    return error(web.HTTPUnauthorized, reason, **{"WWW-Authenticate": 'Bearer realm="callmon"'})


def forbidden(reason: str) -> web.HTTPException:
    return error(web.HTTPForbidden, reason)
