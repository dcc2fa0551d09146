"""The reviewer page in a real browser (Debian's headless Chromium driven by Playwright) over
the real stack: sign in with a reviewer key, open a case, override it with the keyboard
alone; the verdict must be in PostgreSQL. A screenshot is kept under test-artifacts/."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from orchestrator.samples import load_samples
from orchestrator.settings import REPO_ROOT

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")  # Debian package `chromium` (scripts/apt-packages.txt)
ARTIFACTS = REPO_ROOT / "test-artifacts"  # gitignored
TENANT = "tenant-review-page"
# Generous: the first paint of a cold Chromium on a loaded 2-core machine.
UI_TIMEOUT_MS = 20_000
expect.set_options(timeout=UI_TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "install Debian's chromium (scripts/apt-packages.txt)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(UI_TIMEOUT_MS)
    yield pg
    context.close()


def test_reviewer_overrides_a_case_with_the_keyboard(
    stack: Any,
    make_key: Any,
    database_url: str,
    review_study: Any,
    page: Page,
    tmp_path: Path,
) -> None:
    images, _ = load_samples()
    uploader = make_key("uploader", tenant=TENANT)
    reviewer = make_key("reviewer", tenant=TENANT)
    with httpx.Client(base_url=stack.api_url, timeout=60) as client:
        study_id = review_study(client, uploader, images[3], priority="stat")
    with psycopg.connect(database_url) as conn:
        case_id, live_label, version, confidence = conn.execute(
            "SELECT rc.id, r.label, r.version, r.confidence FROM review_cases rc"
            " JOIN results r ON r.study_id = rc.study_id"
            " WHERE rc.study_id = %s AND r.model = 'triage' AND r.arm = 'live'",
            (study_id,),
        ).fetchone()
    truth = "pneumonia" if live_label == "normal" else "normal"

    # The page runs under its strict Content-Security-Policy: nothing may be blocked.
    blocked: list[str] = []
    page.on(
        "console",
        lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.goto(f"{stack.api_url}/review")
    # A wrong key is refused in the page itself.
    expect(page.locator("#key")).to_be_focused()
    page.keyboard.type("mt_wrong_key")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("refused")
    # Sign in: the emptied key field has the focus again; type and press Enter.
    expect(page.locator("#key")).to_be_focused()
    expect(page.locator("#key")).to_have_value("")
    page.keyboard.type(reviewer)
    page.keyboard.press("Enter")
    link = page.locator(f'li[data-case-id="{case_id}"] a.case-link')
    expect(link).to_be_visible()
    expect(link.locator('.reason[data-reason="lossy_source"]')).to_be_visible()
    # Open the case by keyboard: the first case link has the focus after the queue loads.
    expect(page.locator("a.case-link").first).to_be_focused()
    link.focus()
    page.keyboard.press("Enter")
    article = page.locator(f'article#case[data-case-id="{case_id}"]')
    expect(article).to_have_attribute("data-status", "open")
    expect(page.locator("#reasons")).to_contain_text("lossy_source")
    # The triage model's live row: model, version, arm, label and confidence as stored.
    live_row = page.locator("tr.result.arm-live", has_text="triage")
    expect(live_row.locator("td")).to_have_text(
        ["triage", str(version), "live", live_label, f"{confidence:.4f}", re.compile(".*")]
    )
    # The preview JPEG arrives through the authenticated fetch and decodes.
    preview = page.locator("img.preview").first
    expect(preview).to_have_attribute("src", re.compile("^blob:"))
    page.wait_for_function("document.querySelector('img.preview').naturalWidth > 0")
    # The analysis model's attention map: an overlay the reviewer toggles, labelled as model
    # attention that is not validated for localisation (no zone findings anywhere).
    overlay = page.locator("svg.attention").first
    expect(overlay).to_be_hidden()
    expect(overlay.locator("rect")).to_have_count(49)
    toggle = page.get_by_label(re.compile("model attention \\(not validated for localisation\\)"))
    toggle.first.check()
    expect(overlay).to_be_visible()
    toggle.first.uncheck()
    expect(overlay).to_be_hidden()
    # The shortcuts below act from anywhere but a form field: focus the case's claim button.
    page.locator("button[data-action=claim]").focus()

    # Claim (c), then override: o focuses the label list, type to choose, Tab to the note.
    page.keyboard.press("c")
    expect(article).to_have_attribute("data-status", "claimed")
    expect(page.locator("button[data-action=agree]")).to_be_focused()
    page.keyboard.press("o")
    expect(page.locator("#correct-label")).to_be_focused()
    page.keyboard.type(truth)
    expect(page.locator("#correct-label")).to_have_value(truth)
    page.keyboard.press("Tab")
    expect(page.locator("#note")).to_be_focused()
    page.keyboard.type("keyboard override")
    page.keyboard.press("Tab")
    expect(page.locator("button[data-action=override]")).to_be_focused()
    page.screenshot(path=str(tmp_path / "review-case.png"), full_page=True)
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Verdict recorded (override)")

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, verdict, correct_label, note, verdict_by_name"
            " FROM review_cases WHERE id = %s",
            (case_id,),
        ).fetchone()
    assert row == ("closed", "override", truth, "keyboard override", "test-reviewer")
    assert blocked == []
    # Back on the queue, the closed case is gone.
    expect(page.locator(f'li[data-case-id="{case_id}"]')).to_have_count(0)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "review-case.png", ARTIFACTS / "review-case.png")
    assert (ARTIFACTS / "review-case.png").stat().st_size > 10_000
