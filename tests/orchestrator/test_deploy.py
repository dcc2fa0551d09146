"""deploy/ and docker-compose.gpu.yml: alert rules under `promtool test rules`, dashboards and
rules querying only metrics the real stack exports, and the compose file's properties."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
COMPOSE = REPO_ROOT / "docker-compose.gpu.yml"
PROMTOOL_TIMEOUT_S = 60
WAIT_S = 120.0
METRIC_RE = re.compile(r"\b((?:medtriage|nv)_[a-z0-9_]+)\b")
# Triton exports these only on a GPU host (the local server runs on the CPU).
GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes"}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: apt-get install --no-install-recommends prometheus"
    return path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S
    )


def test_alert_rules_pass_their_promtool_tests() -> None:
    result = _run("test", "rules", "medtriage.test.yml", cwd=RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    shutil.copy(RULES / "medtriage.yml", tmp_path / "medtriage.yml")
    text = (RULES / "medtriage.test.yml").read_text()
    wrong = text.replace("confidence drift PSI 0.40", "confidence drift PSI 0.99")
    assert wrong != text
    (tmp_path / "medtriage.test.yml").write_text(wrong)
    result = _run("test", "rules", "medtriage.test.yml", cwd=tmp_path)
    assert result.returncode == 1, result.stdout


def test_prometheus_config_is_valid() -> None:
    result = _run("check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"medtriage-api", "medtriage-worker", "triton"}


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard.get("templating", {}).get("list", []) if "query" in v]
    return exprs


def queried_metrics() -> dict[str, set[str]]:
    """Metric names each dashboard and the rule file query."""
    out = {
        name: {m for e in _exprs(d) for m in METRIC_RE.findall(e)}
        for name, d in _dashboards().items()
    }
    rules = yaml.safe_load((RULES / "medtriage.yml").read_text())
    out["rules"] = {
        m for g in rules["groups"] for r in g["rules"] for m in METRIC_RE.findall(r["expr"])
    }
    return out


def test_dashboards_are_provisioned() -> None:
    dashboards = _dashboards()
    assert set(dashboards) == {"overview", "models", "triton"}
    assert len({d["uid"] for d in dashboards.values()}) == 3
    for d in dashboards.values():
        assert d["panels"] and all(p["datasource"]["uid"] == "prometheus" for p in d["panels"])
    models = json.dumps(dashboards["models"])
    for needle in ("medtriage_model_confidence_bucket", "medtriage_model_drift_psi", "A/B share"):
        assert needle in models
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/medtriage.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
}


def exported_names(texts: list[str]) -> set[str]:
    """Series names the endpoints export: every sample, plus the series of every declared
    family (HELP/TYPE present) that has no sample yet, e.g. an error counter before any error
    or a drift gauge before the window is full."""
    names = set()
    for text in texts:
        # Sample lines as Prometheus ingests them (Triton's counters carry no _total suffix).
        names |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))
        for family in text_string_to_metric_families(text):
            names |= {s.name for s in family.samples}
            names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def process_one_study(api_url: str, key: str) -> None:
    client = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    pixels, _ = load_samples()
    uid = generate_uid()
    files = [
        (
            "files",
            (
                f"i{i}.dcm",
                radiograph(pixels[i], study_uid=uid, instance_number=i),
                "application/dicom",
            ),
        )
        for i in range(2)
    ]
    study_id = client.post("/v1/studies", files=files).json()["id"]
    deadline = time.monotonic() + WAIT_S
    while client.get(f"/v1/studies/{study_id}").json()["status"] not in {
        "done",
        "needs_review",
        "failed",
    }:
        assert time.monotonic() < deadline, "study did not finish"
        time.sleep(0.2)


@pytest.mark.integration
def test_every_queried_metric_is_exported_by_the_running_stack(
    stack: Any, triton: Any, make_key: Any
) -> None:
    process_one_study(stack.api_url, make_key("uploader"))
    groups = httpx.get(f"{stack.api_url}/metrics/targets", timeout=10).json()
    urls = [f"{stack.api_url}/metrics", triton.metrics_url]
    urls += [f"http://{t}/metrics" for g in groups for t in g["targets"]]
    assert len(urls) >= 3, urls
    exported = exported_names([httpx.get(u, timeout=10).text for u in urls])
    missing = {
        source: sorted(names - exported - GPU_ONLY)
        for source, names in queried_metrics().items()
        if names - exported - GPU_ONLY
    }
    assert missing == {}, (missing, sorted(n for n in exported if n.startswith("nv_")))


def test_metric_name_check_catches_a_typo() -> None:
    assert METRIC_RE.findall("rate(medtriage_studies_procesed_total[5m])") == [
        "medtriage_studies_procesed_total"
    ]


# --- docker-compose.gpu.yml -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "triton",
        "migrate",
        "api",
        "worker",
        "postgres",
        "redis",
        "minio",
        "prometheus",
        "grafana",
    }


def test_compose_triton_uses_the_gpu_and_the_repository(compose: dict[str, Any]) -> None:
    triton = compose["services"]["triton"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d+\.\d+-py3", triton["image"])
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "./model_repository:/models:ro" in triton["volumes"]
    # Model control (load/unload over HTTP/gRPC) never published on the host.
    assert "ports" not in triton
    assert "--model-control-mode=explicit" in triton["command"]


def test_compose_health_checks_and_ordering(compose: dict[str, Any]) -> None:
    services = compose["services"]
    one_shot = {"migrate"}
    for name, service in services.items():
        assert "healthcheck" in service or name in one_shot, name
        for dep, cond in service.get("depends_on", {}).items():
            wanted = "service_completed_successfully" if dep in one_shot else "service_healthy"
            assert cond == {"condition": wanted}, (name, dep)
            assert dep in services
    for name in ("api", "worker"):
        assert set(services[name]["depends_on"]) >= {
            "postgres",
            "redis",
            "minio",
            "triton",
            "migrate",
        }
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert "ports" not in services["worker"]
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_compose_runs_the_app_as_the_least_privilege_role(compose: dict[str, Any]) -> None:
    """Issue 16: the API and workers log in as medtriage_app (no DDL, append-only audit);
    only the one-shot migration connects as the owner."""
    services = compose["services"]
    for name in ("api", "worker"):
        url = services[name]["environment"]["MEDTRIAGE_DATABASE_URL"]
        assert url.startswith("postgresql://medtriage_app:"), (name, url)
    migrate = services["migrate"]
    assert migrate["environment"]["MEDTRIAGE_DATABASE_URL"].startswith("postgresql://medtriage:")
    assert "medtriage db upgrade" in " ".join(migrate["command"])
    assert "medtriage db app-login" in " ".join(migrate["command"])
    example = (DEPLOY / ".env.example").read_text()
    assert "MEDTRIAGE_APP_DB_PASSWORD=" in example
    assert "MEDTRIAGE_AUDIT_ANCHOR_KEY=" in example


def test_compose_mounts_dashboards_and_prometheus_config(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    for host in (v.split(":")[0] for s in services.values() for v in s.get("volumes", [])):
        if host.startswith("./"):
            assert (REPO_ROOT / host).exists(), host


def test_compose_keeps_secrets_in_env_files(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    assert not re.search(
        r"(?i)(password|secret)[^:\n]*:\s*['\"]?[a-z0-9]{4,}", text.replace("${", "")
    ) or all(
        "${" in line or "env_file" in line
        for line in text.splitlines()
        if re.search(r"(?i)password\S*:\s*\S", line)
    )
    for service in compose["services"].values():
        for value in (service.get("environment") or {}).values():
            assert not re.search(r"(?i)change-me", str(value))
    secrets = [s for s in compose["services"].values() if s.get("env_file")]
    assert secrets and all(s["env_file"] == [".env"] for s in secrets)
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()
    assert (DEPLOY / ".env.example").exists()
    tracked = subprocess.run(
        ["git", "ls-files", ".env"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert tracked.stdout.strip() == ""


DOCKERFILE = REPO_ROOT / "Dockerfile"


def _dockerfile_copies() -> list[str]:
    """The repository paths the Dockerfile copies into the image's build context."""
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    return [src for line in lines if line.startswith("COPY ") for src in line.split()[1:-1]]


def test_the_compose_build_has_a_dockerfile_for_the_serving_path(compose: dict[str, Any]) -> None:
    builds = {s["build"] for s in compose["services"].values() if "build" in s}
    assert builds == {"."}
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # The serving path only (no training extra, hence no torch), as a user other than root,
    # with the system library the JPEG 2000 shortcut needs.
    installs = [line for line in lines if "pip install" in line]
    assert installs == ["RUN pip install . && rm -rf /src"]
    assert not any("torch" in line or "[training" in line for line in lines if line[0] != "#")
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    assert "libopenjp2-7" in text
    for src in _dockerfile_copies():
        assert (REPO_ROOT / src).exists(), f"{src} copied by the Dockerfile is missing"


def test_a_plain_install_carries_what_the_serving_path_reads(tmp_path: Path) -> None:
    """What the image's `pip install .` puts in site-packages: a wheel built, as in the image,
    from only what the Dockerfile copies (not from the checkout, where a build/ folder could
    carry stale files into it): migrations, the Triton template, the report schema and the
    de-identification tables load."""
    source = tmp_path / "src"
    source.mkdir()
    for src in _dockerfile_copies():
        if (REPO_ROOT / src).is_dir():
            shutil.copytree(
                REPO_ROOT / src, source / src, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO_ROOT / src, source / src)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("medtriage-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    probe = (
        "import json, orchestrator, preprocess.j2k\n"
        "from importlib import resources\n"
        "from orchestrator.store.db import migrate\n"
        f"assert orchestrator.__file__.startswith({str(site)!r}), orchestrator.__file__\n"
        "root = resources.files('orchestrator')\n"
        "print(len(list((root / 'store' / 'db' / 'migrations').glob('*.sql'))))\n"
        "assert (root / 'inference' / 'local_triton' / 'model.py.tmpl').read_text().startswith('\"\"\"')\n"
        "json.loads((root / 'reports' / 'report.schema.json').read_text())\n"
        "from orchestrator.privacy import deid\n"
        "assert len(deid.RECIPE) > 250 and deid.SAFE and deid.load_burn_in_rules() == []\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    shipped = sorted(p.name for p in (REPO_ROOT / "orchestrator/store/db/migrations").glob("*.sql"))
    assert int(ran.stdout.strip()) == len(shipped)


def test_compose_encrypts_objects_at_rest(compose: dict[str, Any]) -> None:
    """The S3 store writes every object with SSE-S3 and refuses to read one without it, which
    MinIO serves only with a KMS; the application seals objects with its own keys too."""
    services = compose["services"]
    assert str(services["minio"]["environment"]["MINIO_KMS_SECRET_KEY"]).startswith("${")
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["MEDTRIAGE_STORAGE_URL"].startswith("s3://")
        assert str(env["MEDTRIAGE_STORAGE_ENCRYPTION_KEYS"]).startswith("${")
        assert env.get("MEDTRIAGE_S3_SSE", "AES256") == "AES256"
    example = (DEPLOY / ".env.example").read_text()
    for var in ("MINIO_KMS_SECRET_KEY", "MEDTRIAGE_STORAGE_ENCRYPTION_KEYS"):
        assert f"\n{var}=" in example
