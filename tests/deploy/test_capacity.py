"""deploy/README.md's capacity table stays true to the benchmark results file it cites."""

from __future__ import annotations

import re

from orchestrator.settings import REPO_ROOT

README = REPO_ROOT / "deploy" / "README.md"
RESULTS = REPO_ROOT / "benchmarks" / "results" / "e2e-latest.md"
# README row label -> the benchmark's image name
IMAGES = {
    "radiograph 2048×2500 16-bit": "rx-2048x2500-16bit",
    "radiograph 2048×2500 J2K": "rx-2048x2500-j2k",
    "CT 512×512 16-bit": "ct-512x512-16bit",
}
PROCESSES = ("api", "workers", "triton", "postgresql", "redis")
PEAK_SHARE_OF_DAY = 0.10


def _measured(image: str) -> dict[str, float]:
    """CPU ms per image by process, from the 2-worker run (the one every image has)."""
    (row,) = [
        line
        for line in RESULTS.read_text().splitlines()
        if line.startswith(f"| e2e {image}, 2 worker(s) |") and "CPU per image by process" in line
    ]
    cells = row.split("|")[3]
    return {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+)", cells)}


def test_capacity_table_matches_the_benchmark_results() -> None:
    text = README.read_text()
    for label, image in IMAGES.items():
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
        cited = [float(c) for c in row.strip("|").split("|")[1:]]
        measured = _measured(image)
        assert cited == [measured[p] for p in PROCESSES], (label, cited, measured)


def test_demand_rows_follow_from_the_figures() -> None:
    text = README.read_text()
    worker_ms = _measured("rx-2048x2500-16bit")["workers"]
    for per_day, label in ((2000, "2,000"), (100_000, "100,000")):
        (row,) = [line for line in text.splitlines() if f"| {label} |" in line]
        cells = [c.strip() for c in row.strip("|").split("|")]
        peak = per_day * PEAK_SHARE_OF_DAY / 3600
        assert float(cells[2]) == round(peak, 2 if peak < 1 else 1)
        assert float(cells[3].split()[0]) == round(peak * worker_ms / 1000, 3 if peak < 1 else 2)
