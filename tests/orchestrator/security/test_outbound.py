"""SSRF guard (orchestrator/security/outbound.py) for webhook and PACS target URLs: refused
at registration through the real API, and again at send time by the webhook client and the
STOW-RS client, unless MEDTRIAGE_OUTBOUND_ALLOW_NETWORKS allows the network."""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import uuid4

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_app
from orchestrator.deliver import pacs, webhooks
from orchestrator.security.outbound import DestinationRefused, OutboundPolicy
from orchestrator.settings import ApiSettings

PUBLIC = "93.184.216.34"  # an address outside every special-purpose block
# Names a fake resolver answers, as a DNS server someone controls could.
DNS = {
    "hooks.example.org": [PUBLIC],
    "inside.example.org": ["10.20.30.40"],
    "mixed.example.org": [PUBLIC, "192.168.0.7"],
    "meta.example.org": ["169.254.169.254"],
    "v6.example.org": ["2606:2800:220:1:248:1893:25c8:1946"],
}


def _fake_dns(host: str, port: int) -> list[str]:
    try:
        return DNS[host]
    except KeyError:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


STRICT = OutboundPolicy(resolver=_fake_dns)

REFUSED = [
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest", "cloud metadata"),
    ("http://169.254.10.1/", "link-local"),
    ("http://10.1.2.3/", "private"),
    ("https://172.16.5.4:8443/x", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://100.64.0.1/", "non-public"),
    ("http://0.0.0.0:80/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://inside.example.org/hook", "private"),
    ("http://mixed.example.org/hook", "private"),
    ("http://meta.example.org/", "cloud metadata"),
    ("http://nowhere.example.org/", "does not resolve"),
    ("ftp://hooks.example.org/x", "http(s)"),
    ("http:///nohost", "http(s)"),
]


def _literal_or_fake(host: str, port: int) -> list[str]:
    # IP literals resolve to themselves, as getaddrinfo does; names go to the fake DNS.
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        return _fake_dns(host, port)


@pytest.mark.parametrize(("url", "reason"), REFUSED, ids=[u for u, _ in REFUSED])
def test_refused_destinations(url: str, reason: str) -> None:
    with pytest.raises(DestinationRefused, match=re.escape(reason)):
        OutboundPolicy(resolver=_literal_or_fake).check(url)


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.org/medtriage", "https://v6.example.org/x", f"https://{PUBLIC}/"],
)
def test_public_destinations_pass(url: str) -> None:
    OutboundPolicy(resolver=_literal_or_fake).check(url)


@pytest.mark.parametrize(
    "url",
    ["http://localhost:9/x", "http://2130706433/x", "http://0x7f.1/x", "http://127.1/x"],
    ids=["localhost", "decimal", "hex", "short"],
)
def test_real_resolution_sees_through_spellings_of_loopback(url: str) -> None:
    """The system resolver (no network needed) turns these names and odd spellings into
    127.0.0.1; the check is on what they resolve to, not on how they are written."""
    with pytest.raises(DestinationRefused, match="loopback"):
        OutboundPolicy().check(url)


def test_allow_list() -> None:
    loopback = OutboundPolicy.from_setting("127.0.0.0/8, ::1/128")
    loopback.check("https://localhost:9/x")
    loopback.check("http://[::1]:9/x", allow_http=True)
    with pytest.raises(DestinationRefused, match="private"):
        loopback.check("http://10.0.0.1/")
    # A broad allowance does not open the metadata service; only its own address does.
    everything = OutboundPolicy.from_setting("0.0.0.0/0,::/0")
    everything.check("https://10.0.0.1/")
    with pytest.raises(DestinationRefused, match="cloud metadata"):
        everything.check("http://169.254.169.254/")
    OutboundPolicy.from_setting("169.254.169.254/32").check(
        "http://169.254.169.254/", allow_http=True
    )
    with pytest.raises(ValueError, match="not a CIDR"):
        OutboundPolicy.from_setting("10.0.0.0/8,pacs.hospital")
    # The API refuses to start with it, rather than failing each registration later.
    with pytest.raises(ValueError, match="not a CIDR"):
        create_app(ApiSettings(outbound_allow_networks="pacs.hospital"))


class _Receiver:
    """A loopback HTTP server that counts what reaches it and answers STOW-RS-ish JSON."""

    def __init__(self) -> None:
        self.hits = 0
        self.hosts: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                receiver.hits += 1
                receiver.hosts.append(self.headers.get("Host", ""))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    yield r
    r.server.shutdown()


def test_send_time_checks(receiver: _Receiver) -> None:
    """A URL already stored (registered under another setting, or re-pointed in DNS) is
    checked again before each request: nothing reaches the loopback receiver."""
    delivery = {
        "id": uuid4(),
        "event": webhooks.REPORT_CREATED,
        "payload": {"study_id": "x"},
        "secret": "s",
        "url": receiver.url + "/hook",
        "timeout_s": 5.0,
        "allow_http": True,
    }
    with httpx.Client(follow_redirects=False) as client:
        delivered, status, error = webhooks.attempt(client, delivery, OutboundPolicy())
        assert (delivered, status) == (False, None)
        assert error is not None and error.startswith("refused:") and "loopback" in error
        assert receiver.hits == 0
        with pytest.raises(pacs.ExportFailed, match="refused.*loopback"):
            pacs.stow(
                receiver.url + "/dicom-web", [b"DICM"], outbound=OutboundPolicy(), allow_http=True
            )
        assert receiver.hits == 0
        # The control: with loopback allowed both requests are sent.
        allowed = OutboundPolicy.from_setting("127.0.0.0/8")
        assert webhooks.attempt(client, delivery, allowed)[:2] == (True, 200)
        stored = pacs.stow(
            receiver.url + "/dicom-web", [b"DICM"], outbound=allowed, allow_http=True
        )
        assert stored == []
        assert receiver.hits == 2


def test_requests_go_to_the_address_that_was_checked(receiver: _Receiver) -> None:
    """No second resolution by the HTTP client (DNS rebinding): a name only our resolver
    knows (the system cannot resolve ``.test``) is reached at the checked address, with the
    name in the Host header and as the TLS server name."""
    port = receiver.server.server_port

    def dns(host: str, _port: int) -> list[str]:
        assert host == "hooks.test"
        return ["127.0.0.1"]

    policy = OutboundPolicy(allow=OutboundPolicy.from_setting("127.0.0.0/8").allow, resolver=dns)
    dest = policy.check(f"https://hooks.test:{port}/hook?x=1")
    assert (dest.url, dest.host, dest.server_name) == (
        f"https://127.0.0.1:{port}/hook?x=1",
        f"hooks.test:{port}",
        "hooks.test",
    )
    assert dest.extensions == {"sni_hostname": "hooks.test"}
    delivery = {
        "id": uuid4(),
        "event": webhooks.REPORT_CREATED,
        "payload": {},
        "secret": "s",
        "url": f"http://hooks.test:{port}/hook",
        "timeout_s": 5.0,
        "allow_http": True,
    }
    with httpx.Client(follow_redirects=False) as client:
        assert webhooks.attempt(client, delivery, policy)[:2] == (True, 200)
    stored = pacs.stow(
        f"http://hooks.test:{port}/dicom-web", [b"DICM"], outbound=policy, allow_http=True
    )
    assert stored == []
    assert receiver.hosts == [f"hooks.test:{port}"] * 2


@pytest.mark.integration
def test_api_refuses_internal_urls(
    settings_env: dict[str, str], make_key: Any, receiver: _Receiver
) -> None:
    """Through the real API (PostgreSQL, Redis) without the tests' loopback allowance:
    400 naming the reason, and nothing registered."""
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    fields["outbound_allow_networks"] = ""
    tenant = f"tenant-ssrf-{uuid4().hex[:6]}"
    uploader = {"Authorization": f"Bearer {make_key('uploader', tenant=tenant)}"}
    admin = {"Authorization": f"Bearer {make_key('admin', tenant=tenant)}"}
    with TestClient(create_app(ApiSettings(**fields))) as api:
        for url in (
            receiver.url + "/hook",
            "http://169.254.169.254/latest/meta-data/iam/",
            "http://10.0.0.5:8080/",
            "http://localhost:9/",
        ):
            r = api.post("/v1/webhooks", json={"url": url}, headers=uploader)
            assert r.status_code == 400, (url, r.text)
            assert r.json()["error"] == "DestinationRefused"
            r = api.post(
                "/v1/pacs-targets",
                json={"name": "p", "stow_url": url.rstrip("/") + "/dicom-web"},
                headers=admin,
            )
            assert r.status_code == 400, (url, r.text)
            assert r.json()["error"] == "DestinationRefused"
        assert api.get("/v1/webhooks", headers=uploader).json()["items"] == []
        assert api.get("/v1/pacs-targets", headers=admin).json()["items"] == []
    # The same API with loopback allowed registers the receiver: plain http only when an
    # admin allows it for this target.
    fields["outbound_allow_networks"] = "127.0.0.0/8"
    hook = {"url": receiver.url + "/hook"}
    with TestClient(create_app(ApiSettings(**fields))) as api:
        r = api.post("/v1/webhooks", json=hook, headers=uploader)
        assert r.status_code == 400 and "https" in r.json()["detail"], r.text
        r = api.post("/v1/webhooks", json={**hook, "allow_http": True}, headers=uploader)
        assert r.status_code == 403 and "admin" in r.json()["detail"], r.text
        r = api.post("/v1/webhooks", json={**hook, "allow_http": True}, headers=admin)
        assert r.status_code == 201, r.text
        assert r.json()["allow_http"] is True
    assert receiver.hits == 0
