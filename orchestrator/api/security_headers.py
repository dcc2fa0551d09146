"""Browser-facing security headers on every response (a plain ASGI middleware).

The reviewer page loads only its own script and style (served routes, nothing inline), so
the policy allows no inline code at all; JSON answers get the same headers (a browser that
is tricked into rendering one runs nothing). The API description pages (/docs, /redoc, off
in production) load Swagger UI / ReDoc from their CDN and need inline code: they get their
own, looser policy.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Blob and data images: the page shows previews fetched with the key as object URLs.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:;"
    " connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_CDN = "https://cdn.jsdelivr.net"
DOCS_POLICY = (
    f"default-src 'none'; script-src 'self' 'unsafe-inline' {_CDN};"
    f" style-src 'self' 'unsafe-inline' {_CDN} https://fonts.googleapis.com;"
    " font-src https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com;"
    " connect-src 'self'; worker-src blob:; frame-ancestors 'none'; base-uri 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
# Two years, the HSTS preload list's minimum is one.
HSTS_MAX_AGE_S = 2 * 365 * 24 * 3600


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, tls: bool = False) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_POLICY if scope.get("path") in DOCS_PATHS else PAGE_POLICY
        extra = [
            (b"content-security-policy", policy.encode()),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]
        if self.tls:
            hsts = f"max-age={HSTS_MAX_AGE_S}; includeSubDomains"
            extra.append((b"strict-transport-security", hsts.encode()))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                added = [(n, v) for n, v in extra if n not in present]
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
