"""`medtriage demo`: the whole local stack, the sample studies through the HTTP API, a summary.

Starts Triton (bundled binary), the API and workers against PostgreSQL and Redis (configured,
the machine's own, or embedded servers: ``cli/services.py``), creates an uploader key, posts the sample studies, waits for them, prints one line
per study and writes each study's report (and previews) under ``<home>/demo``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from orchestrator import lifecycle
from orchestrator.cli.services import LocalServiceError, LocalServices
from orchestrator.cli.stack import LocalStack
from orchestrator.samples import (
    BREAST_SAMPLES_FILE,
    FUNDUS_SAMPLES_FILE,
    fundus_photo,
    load_samples,
    radiograph,
    ultrasound,
)
from orchestrator.settings import CliSettings
from orchestrator.store.db import upgrade
from orchestrator.store.db.keys import create_key

# Per-study wait for a terminal status before the demo gives up on it.
STUDY_TIMEOUT_S = 180.0
POLL_S = 0.25
HTTP_TIMEOUT_S = 60.0
TERMINAL = lifecycle.TERMINAL_VALUES
# Exit status when no usable PostgreSQL or Redis could be found or started.
EXIT_NO_SERVICES = 2


def sample_studies() -> list[dict[str, Any]]:
    """Chest radiographs (normal, pneumonia, STAT mixed), a breast ultrasound, a fundus
    photograph, CT + MR (no model set takes them), and a study with one bad file."""
    images, labels = load_samples()
    normal = [i for i, y in enumerate(labels) if y == 0]
    pneumonia = [i for i, y in enumerate(labels) if y == 1]

    def chest(name: str, picks: list[int], priority: str | None = None) -> dict[str, Any]:
        uid = generate_uid()
        series = generate_uid()
        files = [
            (
                f"{name}-{n}.dcm",
                radiograph(
                    images[i],
                    study_uid=uid,
                    series_uid=series,
                    instance_number=n + 1,
                    priority=priority,
                ),
            )
            for n, i in enumerate(picks)
        ]
        expected = ["pneumonia" if labels[i] else "normal" for i in picks]
        return {"name": name, "files": files, "expected": expected}

    breast, breast_labels = load_samples(BREAST_SAMPLES_FILE)
    retina, retina_labels = load_samples(FUNDUS_SAMPLES_FILE)
    us_uid, op_uid = generate_uid(), generate_uid()
    ct = Path(str(get_testdata_file("CT_small.dcm")))
    mr = Path(str(get_testdata_file("MR_small.dcm")))
    return [
        chest("chest-normal", normal[:4]),
        chest("chest-pneumonia", pneumonia[:4]),
        chest("chest-stat", [normal[4], pneumonia[4]], priority="STAT"),
        {
            "name": "breast-us",
            "files": [
                (f"us-{n}.dcm", ultrasound(breast[i], study_uid=us_uid, instance_number=n + 1))
                for n, i in enumerate((0, 4))
            ],
            "expected": [int(breast_labels[i]) for i in (0, 4)],
        },
        {
            "name": "fundus",
            "files": [
                (f"op-{n}.dcm", fundus_photo(retina[i], study_uid=op_uid, instance_number=n + 1))
                for n, i in enumerate((0, 6))
            ],
            "expected": [int(retina_labels[i]) for i in (0, 6)],
        },
        {
            "name": "ct-mr-mixed",
            "files": [("CT_small.dcm", ct.read_bytes()), ("MR_small.dcm", mr.read_bytes())],
            "expected": [],
        },
        {
            "name": "with-bad-file",
            "files": [
                (
                    f"chest-{n}.dcm",
                    radiograph(
                        images[i],
                        study_uid=(uid := generate_uid()) if n == 0 else uid,
                        instance_number=n + 1,
                    ),
                )
                for n, i in enumerate(pneumonia[5:7])
            ]
            + [("notes.txt", b"not a DICOM file")],
            "expected": [],
        },
    ]


# Characters of a not-applicable reason shown in the summary table (the report has all of it).
REASON_WIDTH = 70


def _summary_row(name: str, study: dict[str, Any]) -> dict[str, Any]:
    live = [r for i in study["instances"] for r in i["results"] if r["arm"] == "live"]
    labels: dict[str, dict[str, int]] = {}
    for r in live:
        per_model = labels.setdefault(r["model"], {})
        per_model[r["label"]] = per_model.get(r["label"], 0) + 1
    worst = min((r["confidence"] for r in live), default=float("nan"))
    finding_codes = sorted({f["code"] for r in live for f in r["findings"]})
    reasons = sorted(
        {i["error"] or "" for i in study["instances"] if i["status"] == "not_applicable"}
    )
    t = study["timings_ms"]
    inference = sum(v for k, v in t.items() if k in {r["model"] for r in live})
    return {
        "study": name,
        "status": study["status"],
        "images": len(study["instances"]),
        "results": "; ".join(
            f"{model} " + ",".join(f"{k}x{v}" for k, v in sorted(counts.items()))
            for model, counts in sorted(labels.items())
        )
        or "-",
        "min_conf": f"{worst:.2f}" if live else "-",
        "findings": "; ".join(finding_codes) or "-",
        "versions": ",".join(sorted({f"{r['model']}:v{r['version']}" for r in live})) or "-",
        "review": ",".join((study.get("review") or {}).get("reasons") or []) or "-",
        "not_applicable_because": (reasons[0][:REASON_WIDTH] if reasons else "-"),
        "prep_ms": f"{t.get('preprocess', 0):.0f}",
        "infer_ms": f"{inference:.0f}",
        "total_ms": f"{t.get('total_worker', 0):.0f}",
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def main(settings: CliSettings, *, workers: int = 2, out: str | None = None) -> int:
    # First lines: which PostgreSQL and Redis this run uses (configured, the machine's own,
    # or embedded servers started for it and stopped with it).
    try:
        services = LocalServices(settings).start()
    except LocalServiceError as exc:
        print(f"medtriage demo: {exc}", file=sys.stderr)
        return EXIT_NO_SERVICES
    try:
        for line in services.describe(started_note=", stopped with the stack"):
            print(line, flush=True)
        return _run(services.apply(settings), workers=workers, out=out)
    finally:
        services.stop()


def _run(settings: CliSettings, *, workers: int, out: str | None) -> int:
    out_dir = Path(out) if out else settings.home / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    with psycopg.connect(settings.database_url) as conn:
        _, key = create_key(conn, tenant="demo", name="demo-uploader", role="uploader")
    print(
        f"starting the local stack (Triton, API, {workers} workers); logs in {settings.home}/logs"
    )
    started = time.perf_counter()
    with LocalStack(settings, workers=workers) as stack:
        stack.wait_workers_ready(settings.redis_url)
        print(f"stack up in {time.perf_counter() - started:.1f}s at {stack.api_url}")
        headers = {"Authorization": f"Bearer {key}"}
        client = httpx.Client(base_url=stack.api_url, headers=headers, timeout=HTTP_TIMEOUT_S)
        submitted: list[tuple[str, str]] = []
        for study in sample_studies():
            files = [("files", (n, data, "application/dicom")) for n, data in study["files"]]
            response = client.post("/v1/studies", files=files)
            body = response.json()
            rejected = [f for f in body.get("files", []) if f["outcome"] == "rejected"]
            for f in rejected:
                print(f"  {study['name']}: rejected {f['filename']}: {f['reason']}")
            if response.status_code != 202:
                print(f"  {study['name']}: HTTP {response.status_code}: {body}")
                continue
            # One request can carry several studies (CT and MR here): follow each.
            for n, created in enumerate(body["studies"]):
                suffix = f"#{n + 1}" if len(body["studies"]) > 1 else ""
                submitted.append((study["name"] + suffix, created["id"]))
        rows = []
        failures = 0
        for name, study_id in submitted:
            deadline = time.monotonic() + STUDY_TIMEOUT_S
            while True:
                study = client.get(f"/v1/studies/{study_id}").json()
                if study["status"] in TERMINAL or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
            failures += study["status"] not in TERMINAL or study["status"] == "failed"
            rows.append(_summary_row(name, study))
            report = client.get(f"/v1/studies/{study_id}/report")
            if report.status_code == 200:
                (out_dir / f"{name}.report.json").write_bytes(report.content)
            for inst in study["instances"]:
                if inst["preview"]:
                    img = client.get(inst["preview"])
                    (out_dir / f"{name}-{inst['id'][:8]}.jpg").write_bytes(img.content)
        print()
        _print_table(rows)
        (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
        print(f"\nreports and previews in {out_dir}; total {time.perf_counter() - started:.1f}s")
        client.close()
    return 1 if failures else 0
