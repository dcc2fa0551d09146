"""Where the platform may send requests that clients choose: webhooks and PACS targets (SSRF).

A client-supplied URL must name a public address. Refused unless the deployment allows them
(``MEDTRIAGE_OUTBOUND_ALLOW_NETWORKS``, comma-separated CIDRs, e.g. the hospital's PACS
subnet): loopback, link-local (cloud metadata at 169.254.169.254 / fd00:ec2::254), private
(RFC 1918, IPv6 ULA), shared (100.64.0.0/10), multicast, unspecified and reserved addresses,
IPv4-mapped IPv6 forms of any of them included. The metadata addresses stay refused even
under a broad allowance (0.0.0.0/0); only an entry for exactly that address opens them.

IPv6 forms that carry an IPv4 address are decoded and the embedded address checked too:
IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), 6to4 (2002::/16), NAT64
(64:ff9b::/96; the local-use 64:ff9b:1::/48 is refused whole) and Teredo (2001::/32, server
and client). ``http://[2002:7f00:1::1]/`` is loopback, not a public 6to4 address.

Public destinations are called only on the allowed ports (``MEDTRIAGE_OUTBOUND_ALLOW_PORTS``,
443 by default); a network listed in ``MEDTRIAGE_OUTBOUND_ALLOW_NETWORKS`` was opened whole by
the operator, on every port. The scheme is https unless the target was registered by an admin
with ``allow_http`` (``check(..., allow_http=True)``).

A host name is resolved and every address it resolves to is checked, when the URL is
registered and again before each request (a name can be re-pointed after registration).
The request then goes to the address that was checked (``Destination``: the URL with that
address, the name in the Host header and as the TLS server name, so certificates are still
verified against the name): the HTTP client does not resolve the name again, which closes
the DNS-rebinding window. Redirects are never followed by the webhook or STOW-RS clients,
so a public endpoint cannot bounce a request inward.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from orchestrator.errors import BadRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

ALLOW_SETTING = "MEDTRIAGE_OUTBOUND_ALLOW_NETWORKS"
PORTS_SETTING = "MEDTRIAGE_OUTBOUND_ALLOW_PORTS"
# Ports public destinations may be called on unless the deployment says otherwise.
DEFAULT_ALLOWED_PORTS = frozenset({443})
# Instance metadata services (AWS/GCP/Azure/OpenStack on IPv4; AWS on IPv6).
METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use
_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible (not :: or ::1)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class DestinationRefused(BadRequest):
    """A URL the platform will not call: not http(s), unresolvable, or not a public address."""


@dataclass(frozen=True)
class Destination:
    """A checked URL pinned to the address that was checked."""

    url: str  # the URL with its host replaced by the address
    host: str  # the Host header: the original name (and port)
    server_name: str  # what TLS sends as SNI and verifies the certificate against

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        return {**headers, "Host": self.host}

    @property
    def extensions(self) -> dict[str, str]:
        # httpcore's per-request TLS server name; ignored for plain http.
        return {"sni_hostname": self.server_name}


def _pinned(url: str, ip: IPAddress) -> Destination:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    userinfo = parts.netloc[: -len(host)] if len(host) < len(parts.netloc) else ""
    netloc = userinfo + literal + (f":{parts.port}" if parts.port else "")
    return Destination(parts._replace(netloc=netloc).geturl(), host, parts.hostname or "")


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _address(text: str) -> IPAddress:
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _embedded(ip: IPAddress) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, named by the form that carries them."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return [("6to4", ip.sixtofour)]
    if ip.teredo is not None:
        server, client = ip.teredo
        return [("Teredo", client), ("Teredo", server)]
    if ip in _NAT64:
        return [("NAT64", low32)]
    if ip in _COMPATIBLE and int(ip) > 1:
        return [("IPv4-compatible", low32)]
    return []


def _plain(ip: IPAddress) -> str | None:
    if ip in METADATA:
        return "cloud metadata"
    for reason, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return reason
    return None if ip.is_global else "non-public"


def forbidden(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public destination, or None when it is."""
    if ip in _NAT64_LOCAL:
        return "NAT64 local-use (64:ff9b:1::/48), non-public"
    for form, inner in _embedded(ip):
        reason = _plain(inner)
        if reason is not None:
            return f"{form} address embedding {inner}, {reason}"
    return _plain(ip)


@dataclass(frozen=True)
class OutboundPolicy:
    """Public addresses only, plus the networks a deployment allows."""

    allow: tuple[Network, ...] = ()
    resolver: Resolver = field(default=_getaddrinfo, compare=False, repr=False)
    # Ports public destinations may be called on (networks in ``allow``: every port).
    ports: frozenset[int] = DEFAULT_ALLOWED_PORTS

    @classmethod
    def from_settings(cls, settings: Any) -> OutboundPolicy:
        """From ``outbound_allow_networks`` and ``outbound_allow_ports`` of a Settings."""
        return cls.from_setting(
            settings.outbound_allow_networks, ports=settings.outbound_allow_ports
        )

    @classmethod
    def from_setting(
        cls, text: str, *, ports: str = "", resolver: Resolver | None = None
    ) -> OutboundPolicy:
        allowed_ports = set()
        for entry in (e.strip() for e in ports.split(",")):
            if not entry:
                continue
            if not entry.isdigit() or not 0 < int(entry) < 65536:
                raise ValueError(f"{PORTS_SETTING}: {entry!r} is not a port (1-65535)")
            allowed_ports.add(int(entry))
        networks = []
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError as exc:
                raise ValueError(f"{ALLOW_SETTING}: {entry!r} is not a CIDR network") from exc
        return cls(
            tuple(networks),
            resolver=resolver or _getaddrinfo,
            ports=frozenset(allowed_ports) or DEFAULT_ALLOWED_PORTS,
        )

    def _allowed(self, ip: IPAddress) -> bool:
        if ip in METADATA:
            return any(net.num_addresses == 1 and ip in net for net in self.allow)
        return any(ip in net for net in self.allow)

    def check(self, url: str, *, what: str = "url", allow_http: bool = False) -> Destination:
        """Raise DestinationRefused unless every address ``url``'s host resolves to may be
        called on its port; else the URL pinned to the first of them. ``allow_http``: an
        admin allowed this target plain http. Resolution is blocking (it is meant for
        registration and for the senders' own threads)."""
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme not in _DEFAULT_PORTS or not host:
            raise DestinationRefused(f"{what} must be an absolute http(s) URL")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
            addresses = list(dict.fromkeys(_address(a) for a in self.resolver(host, port)))
        except (OSError, ValueError) as exc:  # socket.gaierror is an OSError
            raise DestinationRefused(f"{what} host {host!r} does not resolve") from exc
        if not addresses:
            raise DestinationRefused(f"{what} host {host!r} does not resolve")
        for ip in sorted(addresses, key=str):
            reason = forbidden(ip)
            if reason is not None and not self._allowed(ip):
                raise DestinationRefused(
                    f"{what} host {host!r} is {ip}: {reason}; only public addresses"
                    f" are called unless {ALLOW_SETTING} lists the network"
                )
            if port not in self.ports and not self._allowed(ip):
                raise DestinationRefused(
                    f"{what} port {port} is not allowed for {ip}; public destinations are"
                    f" called on port(s) {', '.join(map(str, sorted(self.ports)))}"
                    f" ({PORTS_SETTING})"
                )
        if parts.scheme != "https" and not allow_http:
            raise DestinationRefused(
                f"{what} must be https; plain http only for a target an admin registered"
                " with allow_http"
            )
        return _pinned(url, addresses[0])
