"""``medtriage drift MODEL [--version N]``: the live confidence distribution of a version
against its committed reference, as a PNG (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg

from orchestrator.inference import drift

# Figure size in inches and resolution: readable in a ticket or a chat message.
FIGSIZE_IN = (8.0, 4.5)
DPI = 110


def render(
    database_url: str, repository: Path, model: str, version: int, window: int, out: Path
) -> drift.Drift | None:
    """Write the plot to ``out``; return the drift (None when the window is too small)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = drift.Reference.load(drift.reference_path(repository, model, version))
    with psycopg.connect(database_url) as conn:
        live = drift.live_confidences(conn, model, version, window)
    result = drift.compare(model, version, reference, live)
    edges = np.asarray(reference.bins)
    widths = np.diff(edges)
    ref_share = np.asarray(reference.counts, dtype=float) / max(1, sum(reference.counts))
    live_counts = drift.histogram(live, reference.bins) if live else np.zeros(len(widths))
    live_share = live_counts / max(1, live_counts.sum())
    fig, ax = plt.subplots(figsize=FIGSIZE_IN, dpi=DPI)
    ax.bar(
        edges[:-1], ref_share, width=widths, align="edge", alpha=0.5, label="reference (validation)"
    )
    ax.stairs(live_share, edges, color="C3", linewidth=2, label=f"live (n={len(live)})")
    ax.set_xlabel("top-class confidence")
    ax.set_ylabel("share of images")
    ax.set_xlim(edges[0], edges[-1])
    ax.legend(loc="upper left")
    stats = (
        f"PSI {result.psi:.3f}, JS distance {result.js:.3f}"
        if result is not None
        else f"too few live results for drift (< {drift.MIN_WINDOW})"
    )
    ax.set_title(f"{model} v{version}: {stats}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return result
