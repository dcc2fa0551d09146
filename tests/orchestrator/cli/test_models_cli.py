"""`medtriage models ...` against the real PostgreSQL and Triton, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "models", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_models_cli_list_route_compare_and_refusals(settings_env: dict[str, str]) -> None:
    listed = _cli(settings_env, "list")
    assert listed.returncode == 0, listed.stderr
    lines = [line.split() for line in listed.stdout.splitlines()[2:]]
    assert {(row[0], row[1], row[2]) for row in lines} >= {
        ("triage", "1", "yes"),
        ("triage", "2", "yes"),
        ("analysis", "1", "yes"),
        ("analysis", "2", "yes"),
    }
    routed = _cli(settings_env, "route", "analysis", "1=70", "2=30")
    assert routed.returncode == 0, routed.stdout + routed.stderr
    assert "70" in routed.stdout and "30" in routed.stdout
    bad = _cli(settings_env, "route", "analysis", "1=70", "2=20")
    assert bad.returncode == 2 and "sum to 100" in bad.stdout
    unknown = _cli(settings_env, "route", "analysis", "1=50", "7=50")
    assert unknown.returncode == 2 and "no version" in unknown.stdout
    compared = _cli(settings_env, "compare", "analysis", "1", "2")
    assert compared.returncode == 0, compared.stderr
    assert "agreement_with_live" in compared.stdout and "p95_latency_ms" in compared.stdout
    back = _cli(settings_env, "rollback", "analysis")
    assert back.returncode == 0, back.stdout + back.stderr
