"""HTML for the reviewer page: the page shell and the queue and case fragments.

The shell (``GET /review``) holds no data: it asks for the reviewer's API key, keeps it in
the tab's ``sessionStorage`` and fetches the fragments (``/v1/review/.../view``) and the
preview JPEGs with ``Authorization: Bearer``, so every byte of patient data passes the same
role checks and audit as the JSON API. Everything is reachable by keyboard: links and
buttons in tab order, and single-key shortcuts (c claim, a agree, o override, r release,
q queue) outside text fields. Every value from the database is escaped here.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Any

# What each gate reason code means, for people (orchestrator/triage/gate.py).
REASON_TEXT = {
    "critical_finding": "a finding above the critical probability (urgent)",
    "low_confidence": "the model's top-class confidence is below the threshold",
    "high_entropy": "the class probabilities are close to a coin toss",
    "shadow_disagreement": "a shadow model version disagrees with the live one",
    "lossy_source": "the source image was lossy-compressed",
    "unusual_photometric": "unusual photometric interpretation",
    "frames_dropped": "only the first frame of a multi-frame image was read",
    "instance_failed": "an image of the study could not be processed",
    "positive_finding": "positive at the model's stated operating point (never finalised unreviewed)",
    "out_of_distribution": "the image is unlike what the model learned from: its output means little",
    "applicability_uncertain": "a tag the model set's rules need was absent (body part, view or age)",
}
# The attention overlay's colour (RGB) at full activation; opacity follows the activation.
_ATTENTION_FILL = "#ff4020"
ATTENTION_LABEL = "Show model attention (not validated for localisation)"


def _attention_svg(grid: list[list[float]]) -> str:
    """The attention map as an SVG grid laid over the preview, hidden until toggled."""
    rows, cols = len(grid), len(grid[0]) if grid else 0
    cells = "".join(
        f'<rect x="{c}" y="{r}" width="1" height="1" fill-opacity="{max(0.0, min(1.0, float(v))) * 0.6:.3f}"/>'
        for r, row in enumerate(grid)
        for c, v in enumerate(row)
    )
    return (
        f'<svg class="attention" hidden viewBox="0 0 {cols} {rows}" preserveAspectRatio="none"'
        f' fill="{_ATTENTION_FILL}" aria-label="model attention map" role="img">{cells}</svg>'
    )


DISCLAIMER = "AI-generated triage output, not a diagnosis."


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _reasons(reasons: Iterable[str]) -> str:
    return " ".join(f'<span class="reason" data-reason="{_e(r)}">{_e(r)}</span>' for r in reasons)


def queue(rows: list[dict[str, Any]]) -> str:
    """The open and claimed cases, most urgent first, as a list of links."""
    if not rows:
        return '<h2 id="queue-title">Review queue</h2><p id="queue-empty">No case to review.</p>'
    items = []
    for r in rows:
        holder = f" · claimed by {_e(r['claimed_by_name'])}" if r["status"] == "claimed" else ""
        items.append(
            f'<li data-case-id="{_e(r["id"])}" data-urgency="{_e(r["urgency"])}">'
            f'<a class="case-link" href="#case/{_e(r["id"])}">'
            f'<span class="priority priority-{_e(r["priority"])}">{_e(r["priority"])}</span> '
            f"urgency {_e(r['urgency'])} · {_reasons(r['reasons'])} · "
            f"{_e(r['status'])}{holder} · opened {_e(r['created_at'])}</a></li>"
        )
    return (
        f'<h2 id="queue-title">Review queue ({len(rows)})</h2>'
        f'<ol class="queue" aria-labelledby="queue-title">{"".join(items)}</ol>'
    )


def _findings(findings: list[dict[str, Any]] | None) -> str:
    if not findings:
        return "—"
    parts = []
    for f in findings:
        where = f" ({_e(f['attention'])})" if f.get("attention") else ""
        parts.append(f"{_e(f.get('code'))} {float(f.get('probability', 0.0)):.2f}{where}")
    return "; ".join(parts)


def _instances(view: dict[str, Any]) -> str:
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for r in view["results"]:
        by_instance.setdefault(r["instance_id"], []).append(r)
    blocks = []
    for n, (iid, results) in enumerate(by_instance.items(), start=1):
        first = results[0]
        img = (
            f'<img class="preview" data-src="/v1/studies/{_e(view["study_id"])}/instances/'
            f'{_e(iid)}/preview" alt="Preview of image {n}" width="256">'
            if first["has_preview"]
            else "<p>No preview.</p>"
        )
        warnings = ", ".join(first.get("warnings") or []) or "none"
        grid = next(
            (r["attention"] for r in results if r["arm"] == "live" and r.get("attention")), None
        )
        if grid and first["has_preview"]:
            img = (
                f'<div class="overlay">{img}{_attention_svg(grid)}</div>'
                f'<label><input type="checkbox" class="attention-toggle"> {ATTENTION_LABEL}</label>'
            )
        rows = "".join(
            f'<tr class="result arm-{_e(r["arm"])}"><td>{_e(r["model"])}</td>'
            f"<td>{_e(r['version'])}</td><td>{_e(r['arm'])}</td><td>{_e(r['label'])}</td>"
            f'<td class="confidence">{float(r["confidence"]):.4f}</td>'
            f"<td>{_findings(r['findings'])}</td></tr>"
            for r in results
        )
        blocks.append(
            f'<section class="instance" data-instance-id="{_e(iid)}">'
            f"<h3>Image {n}</h3><figure>{img}"
            f"<figcaption>preprocessing warnings: {_e(warnings)}</figcaption></figure>"
            "<table><caption>Model results</caption><thead><tr><th scope=col>Model</th>"
            "<th scope=col>Version</th><th scope=col>Arm</th><th scope=col>Label</th>"
            "<th scope=col>Confidence</th><th scope=col>Findings</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></section>"
        )
    return "".join(blocks) or "<p>No model results (every image failed).</p>"


def _verdict(view: dict[str, Any]) -> str:
    status = view["status"]
    if status == "closed":
        label = f" → {_e(view['correct_label'])}" if view["verdict"] == "override" else ""
        note = f"<p>Note: {_e(view['note'])}</p>" if view.get("note") else ""
        return (
            f'<p id="verdict-done">Verdict: <strong>{_e(view["verdict"])}</strong>{label}'
            f" by {_e(view['verdict_by_name'])} at {_e(view['closed_at'])}</p>{note}"
        )
    if status == "open":
        return (
            '<button type="button" data-action="claim" aria-keyshortcuts="c">'
            "Claim this case (c)</button>"
        )
    if not view["mine"]:
        return f"<p>Claimed by {_e(view['claimed_by_name'])} at {_e(view['claimed_at'])}.</p>"
    options = "".join(f'<option value="{_e(lab)}">{_e(lab)}</option>' for lab in view["labels"])
    return (
        '<form id="verdict-form">'
        '<button type="button" data-action="agree" aria-keyshortcuts="a">'
        "Agree with the model (a)</button>"
        "<fieldset><legend>Override</legend>"
        f'<label for="correct-label">Correct label</label> <select id="correct-label">'
        f'<option value="">— choose —</option>{options}</select> '
        '<label for="note">Note</label> <textarea id="note" rows="2" cols="40"></textarea> '
        '<button type="button" data-action="override" aria-keyshortcuts="o">'
        "Override (o)</button></fieldset>"
        '<button type="button" data-action="release" aria-keyshortcuts="r">'
        "Release the case (r)</button></form>"
    )


def case(view: dict[str, Any]) -> str:
    """One case: why it is here, the images with every model's results, the verdict controls."""
    reasons = "".join(
        f'<li data-reason="{_e(r)}"><code>{_e(r)}</code>: {_e(REASON_TEXT.get(r, r))}</li>'
        for r in view["reasons"]
    )
    return (
        f'<article id="case" data-case-id="{_e(view["id"])}" data-status="{_e(view["status"])}">'
        f"<h2>Case {_e(str(view['id'])[:8])} <small>({_e(view['status'])})</small></h2>"
        f"<p>Study <code>{_e(view['study_uid'])}</code> · priority "
        f"<strong>{_e(view['priority'])}</strong> · urgency {_e(view['urgency'])} · opened "
        f"{_e(view['created_at'])}</p>"
        f'<section><h3>Why it needs review</h3><ul id="reasons">{reasons}</ul></section>'
        f'<section id="verdict" aria-label="Verdict">{_verdict(view)}</section>'
        f"{_instances(view)}"
        f'<p class="disclaimer">{DISCLAIMER}</p></article>'
    )


STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:1rem 2rem;color:#111}
a:focus,button:focus,select:focus,textarea:focus,input:focus{outline:3px solid #1a5fb4}
.queue li{margin:.3rem 0}.reason{background:#fde7c8;padding:0 .3rem;border-radius:3px}
.priority-stat{color:#a00;font-weight:bold}table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #bbb;padding:.2rem .5rem}.arm-shadow{color:#666}
.instance{display:flex;gap:1rem;align-items:flex-start}.disclaimer{font-weight:bold}
#status{min-height:1.5rem;color:#1a5fb4}
.overlay{position:relative;display:inline-block}svg[hidden]{display:none}.overlay svg{position:absolute;inset:0;
width:100%;height:100%;pointer-events:none}
"""

SCRIPT = r"""
const main = document.getElementById('main'), status = document.getElementById('status');
const key = () => sessionStorage.getItem('medtriage-key');
function say(text) { status.textContent = text; }
async function api(path, opts = {}) {
  const r = await fetch(path, {...opts, headers: {...(opts.headers || {}),
    'Authorization': 'Bearer ' + key()}});
  if (r.status === 401) { signOut('Your key was refused; sign in again.'); throw new Error('401'); }
  return r;
}
function signOut(message) {
  sessionStorage.removeItem('medtriage-key');
  document.getElementById('login').hidden = false;
  document.getElementById('app').hidden = true;
  document.getElementById('key').value = '';
  say(message || 'Signed out.');
  document.getElementById('key').focus();
}
async function showQueue() {
  const r = await api('/v1/review/queue/view');
  main.innerHTML = await r.text();
  const first = main.querySelector('a.case-link');
  (first || main.querySelector('h2')).focus();
}
async function showCase(id) {
  const r = await api('/v1/review/cases/' + id + '/view');
  if (!r.ok) { say('Case not found.'); return showQueue(); }
  main.innerHTML = await r.text();
  for (const img of main.querySelectorAll('img[data-src]')) {
    const p = await api(img.dataset.src);
    if (p.ok) img.src = URL.createObjectURL(await p.blob());
  }
  const action = main.querySelector('#verdict button, #verdict select');
  (action || main.querySelector('h2')).focus();
}
async function act(action) {
  const article = document.getElementById('case');
  if (!article) return;
  const id = article.dataset.caseId;
  let path = '/v1/review/cases/' + id + '/', body;
  if (action === 'claim' || action === 'release') path += action;
  else {
    path += 'verdict';
    body = {verdict: action};
    const note = document.getElementById('note');
    if (note && note.value) body.note = note.value;
    if (action === 'override') body.correct_label = document.getElementById('correct-label').value;
  }
  const r = await api(path, {method: 'POST', body: body && JSON.stringify(body),
    headers: body ? {'Content-Type': 'application/json'} : {}});
  const answer = await r.json();
  if (!r.ok) { say('Refused: ' + (typeof answer.detail === 'string' ? answer.detail
    : JSON.stringify(answer.detail))); return; }
  say(action === 'claim' ? 'Claimed.' : action === 'release' ? 'Released.'
    : 'Verdict recorded (' + action + ').');
  if (action === 'release' || answer.status === 'closed') { location.hash = '#queue'; }
  await route();
}
function route() {
  const m = location.hash.match(/^#case\/([0-9a-f-]{36})$/);
  return m ? showCase(m[1]) : showQueue();
}
document.getElementById('login').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  sessionStorage.setItem('medtriage-key', document.getElementById('key').value.trim());
  const r = await fetch('/v1/review/queue', {headers: {'Authorization': 'Bearer ' + key()}});
  if (!r.ok) { return signOut(r.status === 403 ? 'This key is not a reviewer key.'
    : 'This key was refused.'); }
  document.getElementById('key').value = '';
  document.getElementById('login').hidden = true;
  document.getElementById('app').hidden = false;
  say('Signed in.');
  await route();
});
main.addEventListener('change', (ev) => {
  if (!ev.target.classList.contains('attention-toggle')) return;
  const svg = ev.target.closest('figure').querySelector('svg.attention');
  if (svg) svg.toggleAttribute('hidden', !ev.target.checked);
});
// The verdict form is driven by its buttons; Enter in the note field must not submit it.
main.addEventListener('submit', (ev) => ev.preventDefault());
main.addEventListener('click', (ev) => {
  const b = ev.target.closest('button[data-action]');
  if (b) act(b.dataset.action);
});
document.getElementById('signout').addEventListener('click', () => signOut());
window.addEventListener('hashchange', route);
document.addEventListener('keydown', (ev) => {
  const t = ev.target.tagName;
  if (ev.ctrlKey || ev.metaKey || ev.altKey || t === 'INPUT' || t === 'TEXTAREA' || t === 'SELECT') return;
  if (!key()) return;
  const shortcuts = {c: 'claim', a: 'agree', r: 'release'};
  if (ev.key === 'q') { ev.preventDefault(); location.hash = '#queue'; }
  else if (ev.key === 'o') { const s = document.getElementById('correct-label');
    if (s) { ev.preventDefault(); s.focus(); } }
  else if (shortcuts[ev.key] && document.querySelector('button[data-action=' + shortcuts[ev.key] + ']')) {
    ev.preventDefault(); act(shortcuts[ev.key]);
  }
});
if (key()) { document.getElementById('login').hidden = true;
  document.getElementById('app').hidden = false; route(); }
"""


def page() -> str:
    """The shell: sign-in form, a live status line, the fragment area and the script."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>medtriage review</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/review/app.css"></head><body>'
        "<header><h1>medtriage review</h1></header>"
        '<form id="login"><label for="key">Reviewer API key</label> '
        '<input id="key" type="password" autocomplete="off" required autofocus> '
        '<button type="submit">Sign in</button></form>'
        '<div id="app" hidden><nav><a href="#queue">Queue (q)</a> '
        '<button type="button" id="signout">Sign out</button></nav>'
        '<main id="main" tabindex="-1"></main></div>'
        '<p id="status" role="status" aria-live="polite"></p>'
        f"<footer><p>{DISCLAIMER}</p></footer>"
        '<script src="/review/app.js"></script></body></html>'
    )
