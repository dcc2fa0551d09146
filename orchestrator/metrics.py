"""Every Prometheus metric of the orchestrator, declared here and nowhere else.

Label values come from fixed sets (route templates, status codes, stage, model, version,
arm, outcome): never study, patient or file identifiers.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

HTTP_REQUESTS = Counter(
    "medtriage_http_requests_total",
    "API requests by route template and status.",
    ["route", "status"],
)
HTTP_LATENCY = Histogram(
    "medtriage_http_request_duration_seconds",
    "API request latency by route template.",
    ["route"],
    buckets=LATENCY_BUCKETS_S,
)
# Alert on any increase: someone used emergency access (orchestrator/security/breakglass.py).
BREAK_GLASS_GRANTS = Counter(
    "medtriage_break_glass_grants_total",
    "Break-glass (emergency access) grants by granted role.",
    ["role"],
)
