"""SSRF guard gaps of issue 16 (item 10), as unit tests with no network: IPv6 forms that
embed an IPv4 address (6to4, NAT64, IPv4-mapped / -compatible, Teredo) are decoded and the
embedded address checked; only allowed ports (443 by default) on public addresses; https
only unless an admin allowed plain http for the target."""

from __future__ import annotations

import ipaddress
import re

import pytest

from orchestrator.security.outbound import DestinationRefused, OutboundPolicy, forbidden

PUBLIC = "93.184.216.34"


def _literal(host: str, port: int) -> list[str]:
    return [str(ipaddress.ip_address(host))]


POLICY = OutboundPolicy(resolver=_literal)

EMBEDDED = [
    ("https://[2002:7f00:1::1]/", "6to4", "127.0.0.1", "loopback"),
    ("https://[2002:a9fe:a9fe::1]/", "6to4", "169.254.169.254", "cloud metadata"),
    ("https://[2002:c0a8:0101::]/", "6to4", "192.168.1.1", "private"),
    ("https://[64:ff9b::7f00:1]/", "NAT64", "127.0.0.1", "loopback"),
    ("https://[64:ff9b::a00:1]/", "NAT64", "10.0.0.1", "private"),
    ("https://[::127.0.0.1]/", "IPv4-compatible", "127.0.0.1", "loopback"),
    ("https://[::ffff:169.254.169.254]/", "", "169.254.169.254", "cloud metadata"),
    # Teredo: the client address is stored inverted (here 127.0.0.1).
    ("https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "Teredo", "127.0.0.1", "loopback"),
]


@pytest.mark.parametrize(
    ("url", "form", "inner", "reason"), EMBEDDED, ids=[u for u, *_ in EMBEDDED]
)
def test_embedded_ipv4_is_decoded_and_checked(url: str, form: str, inner: str, reason: str) -> None:
    with pytest.raises(DestinationRefused, match=re.escape(reason)) as refused:
        POLICY.check(url)
    assert inner in refused.value.message
    assert form in refused.value.message


def test_6to4_of_a_public_address_passes() -> None:
    six = ipaddress.ip_address("2002:5db8:d822::1")  # embeds 93.184.216.34
    assert forbidden(six) is None
    POLICY.check(f"https://[{six}]/hook")


def test_nat64_local_use_prefix_is_refused() -> None:
    with pytest.raises(DestinationRefused, match="NAT64"):
        POLICY.check("https://[64:ff9b:1::7f00:1]/")


def test_an_allowed_network_still_opens_an_embedded_form() -> None:
    policy = OutboundPolicy.from_setting("2002::/16", resolver=_literal)
    policy.check("https://[2002:7f00:1::1]/")


@pytest.mark.parametrize("port", [22, 25, 80, 6379, 8080])
def test_public_addresses_only_on_allowed_ports(port: int) -> None:
    with pytest.raises(DestinationRefused, match=f"port {port}"):
        POLICY.check(f"https://{PUBLIC}:{port}/", allow_http=True)


def test_allowed_ports_by_setting() -> None:
    policy = OutboundPolicy.from_setting("", ports="443, 8443", resolver=_literal)
    policy.check(f"https://{PUBLIC}:8443/")
    policy.check(f"https://{PUBLIC}/")
    with pytest.raises(DestinationRefused, match="port 22"):
        policy.check(f"https://{PUBLIC}:22/")
    with pytest.raises(ValueError, match="not a port"):
        OutboundPolicy.from_setting("", ports="443,ssh")
    with pytest.raises(ValueError, match="not a port"):
        OutboundPolicy.from_setting("", ports="70000")


def test_an_allowed_network_is_opened_on_every_port() -> None:
    """The operator opened that network whole (a PACS at :8042 on the hospital subnet)."""
    policy = OutboundPolicy.from_setting("10.20.0.0/16", resolver=_literal)
    policy.check("https://10.20.3.4:8042/dicom-web")
    with pytest.raises(DestinationRefused, match="port 8042"):
        policy.check(f"https://{PUBLIC}:8042/dicom-web")


def test_https_only_unless_plain_http_is_allowed_for_the_target() -> None:
    with pytest.raises(DestinationRefused, match="https"):
        POLICY.check(f"http://{PUBLIC}:443/")
    dest = POLICY.check(f"http://{PUBLIC}:443/", allow_http=True)
    assert dest.url == f"http://{PUBLIC}:443/"
    # Plain http still goes only to an allowed port (80 is not, by default).
    with pytest.raises(DestinationRefused, match="port 80"):
        POLICY.check(f"http://{PUBLIC}/", allow_http=True)
    OutboundPolicy.from_setting("", ports="80,443", resolver=_literal).check(
        f"http://{PUBLIC}/", allow_http=True
    )
