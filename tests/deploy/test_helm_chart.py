"""The Helm chart deploy/helm/medtriage, checked without a cluster: rendered and linted by the
Helm 4 SDK (helm-python-sdk) for three value profiles, every object validated with
kubernetes-validate --strict (core kinds) or against the CRD schemas kept in
deploy/helm/crds-schemas (ScaledObject, ServiceMonitor, PrometheusRule), plus what the chart
promises: probes, PDBs only with replicas > 1, pinned non-root images, the KEDA list being the
platform's real queue key, GPU requests, the least-privilege database role, and bad values
refused at render time with the schema's message."""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any
from urllib.parse import urlparse

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from redis import Redis
from rq import Queue

from orchestrator.settings import REPO_ROOT, CommonSettings

CHART = REPO_ROOT / "deploy" / "helm" / "medtriage"
CRD_SCHEMAS = REPO_ROOT / "deploy" / "helm" / "crds-schemas"
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules"
DASHBOARDS = REPO_ROOT / "deploy" / "grafana" / "dashboards"
PROFILES = ("values-minimal.yaml", "values-production.yaml", "values-gpu.yaml")
# The oldest Kubernetes the chart's Chart.yaml admits is 1.27; validate against a current one.
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "mt", "medtriage"
APP_ROLE = "medtriage_app"
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
WORKLOADS = {"Deployment", "Job", "Pod"}


@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def profile(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((CHART / name).read_text()))


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = _chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _rendered(name: str) -> str:
    return json.dumps(render(profile(name)))


def rendered(name: str) -> list[dict[str, Any]]:
    """One render per profile per session (a fresh copy for each test)."""
    return list(json.loads(_rendered(name)))


def by(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _main(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(pod_spec(doc)["containers"][0])


# ---------------------------------------------------------------------------- lint, validate


@pytest.mark.parametrize("name", PROFILES)
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(str(CHART), profile(name), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is "info" (e.g. "icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", PROFILES)
def test_every_object_validates(name: str) -> None:
    docs = rendered(name)
    assert len(docs) > 15
    schemas = {
        p.stem: json.loads(p.read_text()) for p in CRD_SCHEMAS.glob("*.json")
    }  # e.g. keda.sh_v1alpha1_ScaledObject
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            key = f"{doc['apiVersion'].replace('/', '_')}_{doc['kind']}"
            jsonschema.validate(doc, schemas[key])
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_crd_schema_check_catches_a_wrong_field() -> None:
    docs = rendered("values-production.yaml")
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    schema = json.loads((CRD_SCHEMAS / "keda.sh_v1alpha1_ScaledObject.json").read_text())
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 5  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, schema)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod_spec(deployment)["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_custom_resources_follow_the_installed_crds() -> None:
    """ "auto": offline Helm knows no KEDA or Prometheus Operator API, so none render; the
    production and GPU profiles say the CRDs are there."""
    assert not {d["kind"] for d in rendered("values-minimal.yaml")} & CUSTOM_KINDS
    for name in ("values-production.yaml", "values-gpu.yaml"):
        assert {d["kind"] for d in rendered(name)} >= CUSTOM_KINDS


# ---------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("name", PROFILES)
def test_probes(name: str) -> None:
    deployments = {component(d): d for d in by(rendered(name), "Deployment").values()}
    assert set(deployments) == {"api", "worker", "triton", "dimse"}
    for comp, doc in deployments.items():
        main = _main(doc)
        assert "startupProbe" in main and "livenessProbe" in main, comp
        if comp != "worker":  # workers take no traffic: nothing to be ready for
            assert "readinessProbe" in main, comp
    api = _main(deployments["api"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    triton = _main(deployments["triton"])
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = triton["startupProbe"]
    # Minutes for model loading before liveness counts.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("name", PROFILES)
def test_pdb_exactly_where_more_than_one_replica(name: str) -> None:
    docs = rendered(name)
    pdbs = {component(d) for d in by(docs, "PodDisruptionBudget").values()}
    scaled = {component(d): d["spec"]["minReplicaCount"] for d in by(docs, "ScaledObject").values()}
    hpas = {
        component(d): d["spec"]["minReplicas"] for d in by(docs, "HorizontalPodAutoscaler").values()
    }
    for doc in by(docs, "Deployment").values():
        comp = component(doc)
        least = scaled.get(comp, hpas.get(comp, doc["spec"].get("replicas")))
        assert least is not None, comp
        assert (comp in pdbs) == (least > 1), (comp, least)


def test_pdb_follows_a_replica_change() -> None:
    values = profile("values-minimal.yaml")
    assert "api" not in {component(d) for d in by(render(values), "PodDisruptionBudget").values()}
    values["api"]["replicas"] = 3
    assert "api" in {component(d) for d in by(render(values), "PodDisruptionBudget").values()}


@pytest.mark.parametrize("name", PROFILES)
def test_images_pinned_and_pods_locked_down(name: str) -> None:
    workloads = [d for d in rendered(name) if d["kind"] in WORKLOADS]
    assert {
        d["kind"] for d in workloads
    } == WORKLOADS  # Deployments, the migration Job, the test Pod
    for doc in workloads:
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        for c in containers(doc):
            image = c["image"]
            repo, _, tag = image.rpartition(":")
            assert repo and tag and "/" not in tag, image
            assert tag not in {"latest", "stable"}, image
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "add" not in sc["capabilities"]


def test_the_keda_list_is_the_platforms_queue_key() -> None:
    """The list KEDA counts is the one RQ pushes study jobs to, read from the code."""
    for prefix in (None, "hospital-b"):
        values = profile("values-production.yaml")
        if prefix is not None:
            values["queuePrefix"] = prefix
        settings = CommonSettings(**({"queue_prefix": prefix} if prefix else {}))
        key = Queue(settings.queue_name, connection=Redis()).key  # no connection is made
        docs = render(values)
        (scaled,) = [d for d in by(docs, "ScaledObject").values() if component(d) == "worker"]
        redis_trigger = next(t for t in scaled["spec"]["triggers"] if t["type"] == "redis")
        assert redis_trigger["metadata"]["listName"] == key
        worker = next(d for d in by(docs, "Deployment").values() if component(d) == "worker")
        assert env(_main(worker))["MEDTRIAGE_QUEUE_PREFIX"] == settings.queue_prefix


def test_worker_scale_down_waits_for_the_running_study() -> None:
    for name in PROFILES:
        worker = next(
            d for d in by(rendered(name), "Deployment").values() if component(d) == "worker"
        )
        grace = float(env(_main(worker))["MEDTRIAGE_SHUTDOWN_GRACE_S"])
        assert pod_spec(worker)["terminationGracePeriodSeconds"] > grace


def test_triton_autoscales_on_queue_time() -> None:
    docs = rendered("values-gpu.yaml")
    (scaled,) = [d for d in by(docs, "ScaledObject").values() if component(d) == "triton"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "nv_inference_queue_duration_us" in trigger["metadata"]["query"]


def test_gpu_request_only_in_the_gpu_profile() -> None:
    def gpus(name: str) -> Any:
        triton = next(
            d for d in by(rendered(name), "Deployment").values() if component(d) == "triton"
        )
        resources = _main(triton)["resources"]
        return resources["limits"].get("nvidia.com/gpu"), resources["requests"].get(
            "nvidia.com/gpu"
        )

    assert gpus("values-gpu.yaml") == (1, 1)
    assert gpus("values-minimal.yaml") == (None, None)
    assert gpus("values-production.yaml") == (None, None)


def test_triton_model_repository_from_s3_or_a_volume() -> None:
    def arg(name: str) -> str:
        triton = next(
            d for d in by(rendered(name), "Deployment").values() if component(d) == "triton"
        )
        (repo,) = [a for a in _main(triton)["args"] if a.startswith("--model-repository=")]
        return repo.split("=", 1)[1]

    assert arg("values-gpu.yaml") == "s3://medtriage/model_repository"
    assert arg("values-minimal.yaml") == "/models"


@pytest.mark.parametrize("name", PROFILES)
def test_the_app_connects_as_the_least_privilege_role(name: str) -> None:
    docs = rendered(name)
    migrations = (REPO_ROOT / "orchestrator" / "store" / "db" / "migrations").glob("*.sql")
    assert any(APP_ROLE in p.read_text() for p in migrations), "the role comes from a migration"
    for doc in by(docs, "Deployment").values():
        if component(doc) == "triton":
            assert "MEDTRIAGE_DATABASE_URL" not in env(_main(doc))
            continue
        url = env(_main(doc))["MEDTRIAGE_DATABASE_URL"]
        assert urlparse(url).username == APP_ROLE, (component(doc), url)
    (job,) = by(docs, "Job").values()
    assert "pre-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    owner = urlparse(env(_main(job))["MEDTRIAGE_DATABASE_URL"]).username
    assert owner and owner != APP_ROLE


@pytest.mark.parametrize("name", PROFILES)
def test_no_secret_in_values_or_objects(name: str) -> None:
    docs = rendered(name)
    assert "Secret" not in {d["kind"] for d in docs}
    secret_name = re.compile(r"PASSWORD|SECRET|_KEY$|_KEYS$")
    for doc in (d for d in docs if d["kind"] in WORKLOADS):
        for c in containers(doc):
            for var, value in env(c).items():
                if secret_name.search(var) and not var.endswith("_FILE"):
                    assert isinstance(value, dict) and "secretKeyRef" in value, (var, value)


# ---------------------------------------------------------------------------- monitoring, network


def test_prometheus_rule_carries_every_rule_file() -> None:
    (rule,) = by(rendered("values-production.yaml"), "PrometheusRule").values()
    expected = [
        group
        for path in sorted(RULES.glob("*.yml"))
        if not path.name.endswith(".test.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
    ]
    assert rule["spec"]["groups"] == expected
    # Alert templating survives as Prometheus text, not evaluated by Helm.
    assert "{{ $labels.model }}" in json.dumps(rule)


def test_scrape_jobs_are_the_ones_rules_and_dashboards_query() -> None:
    """Under the ServiceMonitor the job label comes from each Service's medtriage.io/job label:
    it must give every job name that the rules and dashboards select on."""
    docs = rendered("values-production.yaml")
    (monitor,) = by(docs, "ServiceMonitor").values()
    label = monitor["spec"]["jobLabel"]
    jobs = {
        d["metadata"]["labels"][label]
        for d in by(docs, "Service").values()
        if label in d["metadata"]["labels"]
    }
    queried = set()
    sources = [*RULES.glob("*.yml"), *DASHBOARDS.glob("*.json")]
    for path in sources:
        for expr in re.findall(r'job=~?\\?"([^"\\]+)', path.read_text()):
            queried |= set(expr.split("|"))
    assert queried, "no job selectors found: the pattern above is wrong"
    assert queried <= jobs, queried - jobs


def test_dashboards_ship_as_sidecar_configmaps() -> None:
    maps = [
        d
        for d in by(rendered("values-minimal.yaml"), "ConfigMap").values()
        if d["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    shipped = {name: json.loads(text) for m in maps for name, text in m["data"].items()}
    assert shipped == {p.name: json.loads(p.read_text()) for p in DASHBOARDS.glob("*.json")}


def test_network_policy_denies_by_default() -> None:
    policies = by(rendered("values-production.yaml"), "NetworkPolicy")
    deny = policies[f"{RELEASE}-medtriage-default-deny"]
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    triton = policies[f"{RELEASE}-medtriage-triton"]["spec"]["ingress"]
    inference_from = {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in triton[0]["from"]
    }
    assert inference_from == {"api", "worker", "dimse"}


def test_helm_test_pod_posts_a_study_and_waits_for_its_report() -> None:
    (pod,) = by(rendered("values-minimal.yaml"), "Pod").values()
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert _main(pod)["command"] == ["python", "/scripts/helm_test_study.py"]
    (scripts,) = [
        d for d in by(rendered("values-minimal.yaml"), "ConfigMap").values()
        if d["metadata"]["name"].endswith("-scripts")
    ]  # fmt: skip
    text = scripts["data"]["helm_test_study.py"]
    assert text == (CHART / "files" / "helm_test_study.py").read_text()
    compile(text, "helm_test_study.py", "exec")
    assert "/v1/studies" in text and "/report" in text


# ---------------------------------------------------------------------------- bad values


def _bad(change: str, value: Any, drop: bool = False) -> dict[str, Any]:
    values = copy.deepcopy(profile("values-gpu.yaml"))
    *parents, leaf = change.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    if drop:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (_bad("api.replicas", -1), "at '/api/replicas': minimum: got -1, want 0"),
        (_bad("workers.replicas", -2), "at '/workers/replicas': minimum"),
        (_bad("triton.gpu.count", 0), "at '/triton/gpu/count': minimum: got 0, want 1"),
        (_bad("triton.gpu.count", None, drop=True), "at '/triton/gpu/count'"),
        (_bad("storage.url", "gs://bucket/objects"), "at '/storage/url': 'gs://bucket/objects' does not match"),
        (_bad("storage.url", "file:///data"), "at '/storage/url'"),
        (_bad("triton.modelRepository.url", "gs://models/x"), "at '/triton/modelRepository/url'"),
        (_bad("image.tag", "latest"), "at '/image/tag'"),
    ],
    ids=[
        "negative-api-replicas", "negative-worker-replicas", "gpu-count-zero", "gpu-without-count",
        "storage-gs", "storage-file", "model-repo-gs", "image-latest",
    ],
)  # fmt: skip
def test_bad_values_fail_at_render_time(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as failed:
        render(values)
    assert "don't meet the specifications of the schema" in str(failed.value)
    assert message in str(failed.value)
