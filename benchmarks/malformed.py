"""Malformed-input robustness at scale: hundreds of distinct bad inputs through every ingest path
of the real local stack (fresh database, Triton, API, 2 workers, the C-STORE receiver).

    python -m benchmarks.malformed              # every input, every path (~6 min on 2 cores)
    python -m benchmarks.malformed --limit 40   # the first 40 inputs (a smoke run)

Inputs (``benchmarks/malformed_inputs.py``): the odd files among pydicom's and
``../shared/data/dicom``'s, mutations of good files, bombs. Paths: REST multipart
``POST /v1/studies``, a raw ``application/dicom`` body, a zip body (each input as the one member;
zip bombs as they are), DICOMweb STOW-RS ``POST /dicomweb/studies?complete=true``, DIMSE C-STORE
(pynetdicom SCU sending the file's bytes as they are; the ones it cannot send are counted as
refused client-side) and ``medtriage import`` on a folder of all of them. Each path has its own
tenant, so one path's accepted instance is not another's duplicate.

Measured per path: outcomes (accepted / rejected 4xx / 5xx / timeout), the slowest answer
(> 5 s counts as a hang), process exits of API, workers and receiver (restarted when they
happen), their peak RSS, and after a drain the studies not in done / failed / needs_review.
Goals: 0 crashes, 0 hangs, 0 5xx, every accepted study terminal, bounded memory. Writes
``benchmarks/results/malformed-<date>.md``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import psycopg

from benchmarks.e2e import fresh_database, rss_mib
from benchmarks.malformed_inputs import Case, build
from orchestrator.cli.stack import LocalStack, free_port
from orchestrator.settings import REPO_ROOT, CliSettings
from orchestrator.store.db.keys import create_key

RESULTS = REPO_ROOT / "benchmarks" / "results"
TERMINAL = ("done", "failed", "needs_review")
PATHS = ("rest-multipart", "rest-raw", "rest-zip", "stow", "dimse", "import")
# An answer slower than this is a hang.
HANG_S = 5.0
# Client deadline per request (a request past it counts as a timeout).
REQUEST_TIMEOUT_S = 30.0
IMPORT_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 240.0
DIMSE_START_TIMEOUT_S = 30.0
RSS_PERIOD_S = 0.2
# Peak RSS goal per process kind (bounded memory): a 2 GiB bomb must not be inflated.
RSS_GOAL_MIB = {"api": 1024, "workers": 3072, "dimse": 1024, "import": 1024}
# The baseline: what the same inputs did before 3e2e4d7 (measured 2026-11-28 on this machine).
BASELINE = [
    "read + check + preprocess in one process: the deflate bombs took 9-20 s each and 2.3 GB;"
    " the 8 MiB zero-element tail 3-7 s; unknown/private transfer syntax UIDs and an"
    " unconvertible VR raised ValueError / NotImplementedError out of the ingest (500); corrupt"
    " RLE made the Rust codec panic (PanicException, a BaseException, escaped every handler)",
    "the stack: `medtriage import` ended with a psycopg DataError traceback after 6.5 s (a NUL in"
    " a UID); after that fix it spent > 300 s on the 25,000-member zip, then peaked at 1,992 MiB"
    " on the zip member that understates its size",
    "tests/orchestrator/ingest/test_malformed_inputs.py with the fixes reverted: REST and STOW requests"
    " timed out (> 60 s, the API's event loop held by a deflate bomb), the import was killed at"
    " 120 s",
]
_BOUNDARY = "medtriage-malformed-7f3a9c1e"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class PathStats:
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    max_s: float = 0.0
    slowest: str = ""
    hangs: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, case: str, outcome: str, elapsed: float, detail: str = "") -> None:
        self.sent += 1
        self.outcomes[outcome] += 1
        if elapsed > self.max_s:
            self.max_s, self.slowest = elapsed, case
        if elapsed > HANG_S:
            self.hangs.append(f"{case} ({elapsed:.1f} s)")
        if outcome in ("5xx", "timeout", "error"):
            self.failures.append(f"{case}: {outcome} {detail[:160]}")


class Supervisor(threading.Thread):
    """Samples RSS (children included) per process kind; notices exits and restarts them."""

    def __init__(self, stack: LocalStack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.extra: dict[str, psutil.Popen | subprocess.Popen[bytes] | None] = {}
        self.peak: dict[str, float] = Counter()
        self.crashes: Counter[str] = Counter()
        self.exit_codes: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def roles(self) -> dict[str, list[int]]:
        out = {"api": [self.stack.procs[0].pid], "workers": [p.pid for p in self.stack.procs[1:]]}
        for role, proc in self.extra.items():
            if proc is not None and proc.poll() is None:
                out[role] = [proc.pid]
        return out

    def run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                roles = self.roles()
            for role, pids in roles.items():
                self.peak[role] = max(self.peak[role], rss_mib(pids))
            self._stop.wait(RSS_PERIOD_S)

    def check(self) -> None:
        """Restart any exited API or worker process (counted as a crash)."""
        with self._lock:
            for index, proc in enumerate(self.stack.procs):
                if proc.poll() is None:
                    continue
                role = "api" if index == 0 else "workers"
                self.crashes[role] += 1
                self.exit_codes.append(f"{role}[{index}] exited {proc.returncode}")
                new = self.stack._spawn(
                    "api" if index == 0 else f"worker-{index - 1}",
                    role[:-1] if role == "workers" else "api",
                )  # noqa: SLF001
                self.stack.procs.remove(new)
                self.stack.procs[index] = new
            dimse = self.extra.get("dimse")
            if dimse is not None and dimse.poll() is not None:
                self.crashes["dimse"] += 1
                self.exit_codes.append(f"dimse exited {dimse.returncode}")
                self.extra["dimse"] = None
        _wait_healthy(self.stack.api_url)

    def stop(self) -> None:
        self._stop.set()


def _wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the API did not come back")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name)[:120]


def _zipped(case: Case) -> bytes:
    if case.is_zip:
        return case.data
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{_safe(case.name)}.dcm", case.data)
    return buf.getvalue()


def _related(data: bytes) -> bytes:
    return (
        f"--{_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{_BOUNDARY}--\r\n".encode()
    )


def _http_senders(client: httpx.Client) -> dict[str, Callable[[Case], httpx.Response]]:
    return {
        "rest-multipart": lambda c: client.post(
            "/v1/studies", files=[("files", (f"{_safe(c.name)}.dcm", c.data, "application/dicom"))]
        ),
        "rest-raw": lambda c: client.post(
            "/v1/studies", content=c.data, headers={"Content-Type": "application/dicom"}
        ),
        "rest-zip": lambda c: client.post(
            "/v1/studies", content=_zipped(c), headers={"Content-Type": "application/zip"}
        ),
        "stow": lambda c: client.post(
            "/dicomweb/studies",
            params={"complete": "true"},
            content=_related(c.data),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={_BOUNDARY}'
            },
        ),
    }


def send_http(
    path: str, send: Callable[[Case], httpx.Response], cases: list[Case], sup: Supervisor
) -> PathStats:
    stats = PathStats()
    for case in cases:
        sup.check()
        started = time.perf_counter()
        try:
            response = send(case)
            status = response.status_code
            outcome = "accepted" if status < 300 else "rejected 4xx" if status < 500 else "5xx"
            detail = f"{status} {response.text[:160]}"
        except httpx.TimeoutException as exc:
            outcome, detail = "timeout", repr(exc)
        except httpx.HTTPError as exc:
            outcome, detail = "error", repr(exc)
        stats.add(case.name, outcome, time.perf_counter() - started, detail)
    print(f"  {path:<15} {dict(stats.outcomes)} max {stats.max_s:.2f} s", flush=True)
    return stats


def _start_dimse(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "dimse", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + DIMSE_START_TIMEOUT_S
    while "listening" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the C-STORE receiver did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def send_dimse(port: int, cases: list[Case], work: Path, sup: Supervisor) -> PathStats:
    """One association per input, proposing exactly the SOP class and transfer syntax its file
    meta names; the file's data set bytes are sent as they are (no re-encoding)."""
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    _config.STORE_SEND_CHUNKED_DATASET = True
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    stats = PathStats()
    for i, case in enumerate(cases):
        sup.check()
        if case.is_zip:
            stats.sent += 1
            stats.outcomes["refused client-side"] += 1
            continue
        path = work / f"{i}.dcm"
        path.write_bytes(case.data)
        try:
            meta, _ = split_dataset(path)
            sop_class = str(meta.MediaStorageSOPClassUID)
            syntax = str(meta.TransferSyntaxUID)
            if not (sop_class + syntax + str(meta.MediaStorageSOPInstanceUID)).isascii():
                raise ValueError("pynetdicom encodes UIDs as ASCII (its reactor thread dies)")
            ae = AE(ae_title="MALFORMED")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = REQUEST_TIMEOUT_S
            ae.add_requested_context(sop_class, syntax)
        except Exception:  # noqa: BLE001 - pynetdicom cannot send it: counted apart
            stats.sent += 1
            stats.outcomes["refused client-side"] += 1
            continue
        started = time.perf_counter()
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDTRIAGE")
        if not assoc.is_established:
            stats.add(case.name, "rejected 4xx", time.perf_counter() - started, "association")
            continue
        try:
            status = assoc.send_c_store(path)
            code = int(status.get("Status", -1)) if status else -1
            comment = str(status.get("ErrorComment", "")) if status else ""
            if code == 0:
                outcome = "accepted"
            elif code == -1:
                outcome = "timeout"
            elif comment.startswith("processing failure"):
                outcome = "5xx"  # the receiver's unexpected-exception branch
            else:
                outcome = "rejected 4xx"
            detail = f"0x{code:04X} {comment}"
        except ValueError as exc:  # no accepted presentation context: the SCP refused it
            outcome, detail = "rejected 4xx", f"context refused: {exc}"
        except Exception as exc:  # noqa: BLE001
            outcome, detail = "error", repr(exc)
        finally:
            assoc.release()
        stats.add(case.name, outcome, time.perf_counter() - started, detail)
        path.unlink()
    print(f"  {'dimse':<15} {dict(stats.outcomes)} max {stats.max_s:.2f} s", flush=True)
    return stats


def send_import(
    env: dict[str, str], cases: list[Case], work: Path, sup: Supervisor
) -> tuple[PathStats, str]:
    folder = work / "import"
    folder.mkdir()
    for i, case in enumerate(cases):
        suffix = ".zip" if case.is_zip else ".dcm"
        (folder / f"{i:04d}-{_safe(case.name)}{suffix}").write_bytes(case.data)
    stats = PathStats()
    cmd = [sys.executable, "-m", "orchestrator.cli", "import", str(folder)]
    cmd += ["--tenant", "malformed-import", "--quiet"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sup.extra["import"] = proc
    try:
        out, _ = proc.communicate(timeout=IMPORT_TIMEOUT_S)
        text = out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        text = "timed out\n" + out.decode(errors="replace")
    elapsed = time.perf_counter() - started
    sup.extra["import"] = None
    match = re.search(r"imported (\d+), duplicate (\d+) .*rejected (\d+)", text)
    stats.sent = len(cases)
    stats.max_s = elapsed
    stats.slowest = "(whole folder, one process)"
    if match:
        stats.outcomes["accepted"] = int(match[1]) + int(match[2])
        stats.outcomes["rejected 4xx"] = int(match[3])
    else:
        stats.outcomes["error"] += 1
        stats.failures.append(f"no summary: {text[-400:]}")
    if proc.returncode not in (0, 1):
        sup.crashes["import"] += 1
        sup.exit_codes.append(f"import exited {proc.returncode}")
        stats.failures.append(text[-500:])
    print(f"  {'import':<15} {dict(stats.outcomes)} in {elapsed:.1f} s, rc {proc.returncode}")
    return stats, f"{elapsed:.1f} s for {len(cases)} files, exit {proc.returncode}"


def drain(db_url: str) -> dict[str, Counter[str]]:
    """Per tenant (path), study counts by status once none is left in flight (or on timeout)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT t.name, s.status, count(*) FROM studies s JOIN tenants t"
                " ON t.id = s.tenant_id GROUP BY 1, 2"
            ).fetchall()
            open_ = sum(n for _, status, n in rows if status not in TERMINAL)
            if not open_ or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    out: dict[str, Counter[str]] = {}
    for tenant, status, n in rows:
        out.setdefault(tenant.removeprefix("malformed-"), Counter())[status] += n
    return out


def run(cases: list[Case], workers: int) -> dict[str, object]:
    home = Path(os.environ.get("MEDTRIAGE_HOME", str(REPO_ROOT / ".medtriage")))
    # Sequential requests from one key: far below any real limit, but above the default.
    os.environ.setdefault("MEDTRIAGE_RATE_LIMIT_PER_S", "1000")
    os.environ.setdefault("MEDTRIAGE_RATE_LIMIT_BURST", "5000")
    stats: dict[str, PathStats] = {}
    with fresh_database() as db_url, tempfile.TemporaryDirectory(prefix="malformed-") as tmp:
        work = Path(tmp)
        settings = CliSettings(
            database_url=db_url,
            queue_prefix=f"malformed-{uuid.uuid4().hex[:6]}",
            storage_url=f"file://{work / 'objects'}",
            port=0,
            home=home,
        )
        keys = {}
        with psycopg.connect(db_url) as conn:
            for path in PATHS[:4]:
                keys[path] = create_key(
                    conn, tenant=f"malformed-{path}", name=path, role="uploader"
                )[1]
        stack = LocalStack(settings, workers=workers)
        # This run's own logs (the home's logs folder is shared with other stacks).
        stack.logs = home / "logs" / f"malformed-{datetime.now(UTC):%Y%m%dT%H%M%S}"
        stack.start()
        sup = Supervisor(stack)
        try:
            stack.wait_workers_ready(settings.redis_url)
            dimse_port = free_port()
            dimse_env = {**stack.env, "MEDTRIAGE_DIMSE_TENANT": "malformed-dimse"}
            sup.extra["dimse"] = _start_dimse(dimse_env, dimse_port, stack.logs / "dimse.log")
            sup.start()
            started = time.perf_counter()
            for path in PATHS[:4]:
                with httpx.Client(
                    base_url=stack.api_url,
                    headers={"Authorization": f"Bearer {keys[path]}"},
                    timeout=REQUEST_TIMEOUT_S,
                ) as client:
                    stats[path] = send_http(path, _http_senders(client)[path], cases, sup)
            stats["dimse"] = send_dimse(dimse_port, cases, work, sup)
            stats["import"], import_note = send_import(stack.env, cases, work, sup)
            sup.check()
            sent_s = time.perf_counter() - started
            studies = drain(db_url)
            drain_s = time.perf_counter() - started - sent_s
            sup.check()
        finally:
            sup.stop()
            dimse = sup.extra.get("dimse")
            if dimse is not None and dimse.poll() is None:
                dimse.terminate()
                dimse.wait(timeout=30)
            stack.stop()
    return {
        "stats": stats,
        "studies": studies,
        "peak": dict(sup.peak),
        "crashes": dict(sup.crashes),
        "exits": sup.exit_codes,
        "import_note": import_note,
        "sent_s": sent_s,
        "drain_s": drain_s,
    }


def write(cases: list[Case], result: dict[str, object], workers: int, build_s: float) -> Path:
    stats: dict[str, PathStats] = result["stats"]  # type: ignore[assignment]
    studies: dict[str, Counter[str]] = result["studies"]  # type: ignore[assignment]
    peak: dict[str, float] = result["peak"]  # type: ignore[assignment]
    crashes: dict[str, int] = result["crashes"]  # type: ignore[assignment]
    now = datetime.now(UTC)
    families = Counter(c.family for c in cases)
    lines = [
        f"# Malformed-input robustness, {now.isoformat(timespec='seconds')}",
        "",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}; "
        "shared with other work",
        f"- stack: fresh PostgreSQL database, Redis, Triton (bundled binary), API, {workers} "
        "workers, `medtriage dimse`; each path its own tenant; requests one at a time",
        f"- inputs: {len(cases)} distinct (built in {build_s:.0f} s, fixed seeds): "
        + ", ".join(f"{k} {v}" for k, v in sorted(families.items())),
        f"- sending took {result['sent_s']:.0f} s, the drain {result['drain_s']:.0f} s; "
        f"import: {result['import_note']}",
        "",
        "| path | sent | accepted | rejected 4xx | 5xx | timeout/error | refused client-side "
        "| max answer (s) | hangs > 5 s | studies | unfinished after drain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in PATHS:
        s = stats[path]
        st = studies.get(path, Counter())
        unfinished = sum(n for status, n in st.items() if status not in TERMINAL)
        lines.append(
            f"| {path} | {s.sent} | {s.outcomes['accepted']} | {s.outcomes['rejected 4xx']} | "
            f"{s.outcomes['5xx']} | {s.outcomes['timeout'] + s.outcomes['error']} | "
            f"{s.outcomes['refused client-side']} | {s.max_s:.2f} | {len(s.hangs)} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(st.items())) or '0'} | {unfinished} |"
        )
    total_5xx = sum(s.outcomes["5xx"] + s.outcomes["error"] for s in stats.values())
    total_hangs = sum(
        len(s.hangs) + s.outcomes["timeout"] for p, s in stats.items() if p != "import"
    )
    unfinished = sum(
        n for st in studies.values() for status, n in st.items() if status not in TERMINAL
    )
    rss = ", ".join(f"{k} {v:.0f} MiB" for k, v in sorted(peak.items()))
    over = [k for k, v in peak.items() if v > RSS_GOAL_MIB.get(k, 1024)]
    lines += [
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
        f"| process crashes (exits) | 0 | {sum(crashes.values())} {crashes or ''} | "
        f"{'yes' if not crashes else 'NO'} |",
        f"| hangs (answer > {HANG_S:.0f} s or timeout) | 0 | {total_hangs} | "
        f"{'yes' if not total_hangs else 'NO'} |",
        f"| 5xx (DIMSE: processing failure; connection errors) | 0 | {total_5xx} | "
        f"{'yes' if not total_5xx else 'NO'} |",
        f"| accepted studies not terminal after the drain | 0 | {unfinished} | "
        f"{'yes' if not unfinished else 'NO'} |",
        f"| peak RSS | {', '.join(f'{k} < {v} MiB' for k, v in RSS_GOAL_MIB.items())} | {rss} | "
        f"{'yes' if not over else 'NO: ' + ', '.join(over)} |",
    ]
    problems = [
        f"- {path}: {line}" for path, s in stats.items() for line in s.failures + s.hangs
    ] + [f"- {e}" for e in result["exits"]]  # type: ignore[attr-defined]
    if problems:
        lines += ["", "## Problems", "", *problems[:80]]
    slowest = [f"- {p}: {s.slowest} ({s.max_s:.2f} s)" for p, s in stats.items()]
    lines += ["", "## Slowest input per path", "", *slowest]
    lines += ["", "## Baseline: before the fixes", "", *(f"- {b}" for b in BASELINE)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"malformed-{now.strftime('%Y-%m-%d')}.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="only the first N inputs")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cases = build()
    if args.limit:
        cases = cases[: args.limit]
    build_s = time.perf_counter() - t0
    print(f"{len(cases)} distinct inputs built in {build_s:.0f} s; {args.workers} workers")
    result = run(cases, args.workers)
    path = write(cases, result, args.workers, build_s)
    print(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
