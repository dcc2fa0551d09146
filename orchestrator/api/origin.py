"""Who sent a request, as far as the audit may believe it: the source address (through
trusted proxies only) and a request id of bounded, harmless form.

``X-Forwarded-For`` is a list each proxy appends its peer to; only the entries added by our
own proxies can be believed. Walking it from the right, every address that is a trusted
proxy is skipped; the first one that is not is the client. A connection that does not come
from a trusted proxy is its own source, whatever it claims (the API's server runs with its
own proxy-header handling off: ``security/tls.py``).
"""

from __future__ import annotations

import ipaddress
import re
import uuid

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TRUSTED_SETTING = "MEDTRIAGE_TRUSTED_PROXIES"
# A client's X-Request-ID is kept when it is a short token (letters, digits, . _ : -).
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def parse_trusted(text: str) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDRs of the proxies in front of the API."""
    networks = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise ValueError(f"{TRUSTED_SETTING}: {entry!r} is not an address or CIDR") from exc
    return tuple(networks)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def source_address(
    peer: str | None, forwarded_for: str, trusted: tuple[Network, ...]
) -> str | None:
    """The client's address: ``peer`` unless it is a trusted proxy, then the nearest
    untrusted address of ``forwarded_for`` (garbage stops the walk at the last proxy)."""
    peer_ip = _ip(peer) if peer else None
    if peer_ip is None or not trusted or not any(peer_ip in n for n in trusted):
        return peer
    source = str(peer_ip)
    for entry in reversed(forwarded_for.split(",") if forwarded_for else []):
        ip = _ip(entry)
        if ip is None:
            break
        source = str(ip)
        if not any(ip in n for n in trusted):
            break
    return source


def request_id(given: str) -> str:
    """The client's request id if it is a short token, else a new one."""
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
