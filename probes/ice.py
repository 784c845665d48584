"""ICE settings shared by the probe and the reflector: servers, relay policy, host candidates.

aiortc's default configuration contacts a public STUN server, and aioice offers every
interface address except loopback. Both sides build their RTCConfiguration here, so no
traffic leaves the machine unless a server is configured, and candidates can be pinned
to loopback, a namespace's veth, or any chosen interface.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import ifaddr
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy


@dataclass(frozen=True, kw_only=True)
class IceServer:
    url: str
    "A `stun:host:port` or `turn:host:port[?transport=udp|tcp]` URL."
    username: str | None = None
    credential: str | None = None

    def __post_init__(self) -> None:
        scheme = self.url.split(":", 1)[0]
        if scheme not in ("stun", "turn", "turns"):
            raise ValueError(f"ICE server URL must start with stun:, turn: or turns: ({self.url})")
        if scheme != "stun" and (self.username is None or self.credential is None):
            raise ValueError(f"TURN server {self.url} needs a username and a credential")


@dataclass(frozen=True, kw_only=True)
class IceOptions:
    servers: tuple[IceServer, ...] = ()
    "STUN/TURN servers; none by default, so nothing is contacted."
    relay_only: bool = False
    "Use only relayed (TURN) candidates."
    hosts: tuple[str, ...] = field(default=())
    "Interface names or IP addresses to offer as host candidates; empty = aioice default."

    def configuration(self) -> RTCConfiguration:
        """Return an explicit RTCConfiguration (never aiortc's public-STUN default)."""
        if self.relay_only and not any(s.url.startswith("turn") for s in self.servers):
            raise ValueError("relay-only needs a TURN server")
        return RTCConfiguration(
            iceServers=[
                RTCIceServer(urls=[s.url], username=s.username, credential=s.credential)
                for s in self.servers
            ],
            iceTransportPolicy=(
                RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
            ),
            bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
        )

    def host_addresses(self) -> tuple[str, ...] | None:
        """Resolve `hosts` to IP addresses, or None to keep aioice's default."""
        if not self.hosts:
            return None
        return resolve_hosts(self.hosts)


def resolve_hosts(hosts: tuple[str, ...]) -> tuple[str, ...]:
    """Turn interface names and literal addresses into a list of IP addresses."""
    adapters = {a.name: a for a in ifaddr.get_adapters()}
    found: list[str] = []
    for host in hosts:
        try:
            found.append(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        adapter = adapters.get(host)
        if adapter is None:
            known = ", ".join(sorted(adapters))
            raise ValueError(f"{host!r} is neither an IP address nor an interface ({known})")
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                found.append(ip.ip)
            elif ip.ip[2] == 0:  # IPv6 with no scope id: link-local ones need one, skip them
                found.append(ip.ip[0])
    if not found:
        raise ValueError(f"no addresses on {', '.join(hosts)}")
    return tuple(dict.fromkeys(found))
