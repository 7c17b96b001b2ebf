"""The per-protein picture of predict.py --plot-dir: eight per-residue tracks with the predicted sites
and segments marked, beside the class probabilities. matplotlib's Agg canvas, no pyplot state.

A track is the model's probability, residue by residue, that the residue is the class's site (SIGNAL, transit
peptides: the last residue of the peptide; ER, PTS1: the first residue of the motif) or part of its segment
(Nucleus, Nucleus_export); a caption under the tracks says so, and what the dashed lines and shaded spans are."""
from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vocab import CLASSES, NO_SIGNAL

TITLE_ID_CHARS = 80  # a longer id is cut in the title (the file name and the other outputs hold it whole)
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
CAPTION = ("tracks: per-residue probability that the residue is the class's site (the last residue of an N-terminal "
           "peptide, the first of a C-terminal motif) or lies in its NLS / NES segment\n"
           "dashed line: predicted site;  shaded span: predicted segment;  bold name: predicted class;  "
           "bars: protein-level probability, with the threshold that calls the class")


def plain(text: str) -> str:
    """Text that matplotlib shows as is ('$' would start mathtext)."""
    return text.replace("$", r"\$")


def draw(path, record: dict, motif: np.ndarray, thresholds, centroid: dict | None = None) -> None:
    """PNG of one protein: record (outputs.protein_record; bars: its probabilities, calibrated ones with the
    uncalibrated as circles when the model has a calibration), motif probabilities [8, L], thresholds [8];
    with centroid (outputs.centroid_fields) its predicted classes in the title."""
    length = record["length"]
    fig = Figure(figsize=(11, 8))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(CLASSES), 2, width_ratios=[4, 1.2], hspace=0.12, wspace=0.32,
                            left=0.13, right=0.93, top=0.92, bottom=0.1)
    x = np.arange(1, length + 1)
    first = None
    for i, c in enumerate(CLASSES):
        ax = fig.add_subplot(grid[i, 0], sharex=first)
        first = first or ax
        ax.plot(x, motif[i], color=COLORS[i], lw=0.9)
        for start, end in record["segments"].get(c, []):
            ax.axvspan(start - 0.5, end + 0.5, color=COLORS[i], alpha=0.25, lw=0)
        if c in record["sites"]:
            site = record["sites"][c]
            ax.axvline(site, color="black", ls="--", lw=0.8)
            left = site > 0.85 * length  # label on the side with room
            ax.annotate(f"site {site}", (site, 0.95), xytext=(-3 if left else 3, 0), textcoords="offset points",
                        ha="right" if left else "left", va="top", fontsize=7)
        ax.set_ylim(-0.03, 1.03)
        ax.set_yticks([0, 1])
        ax.tick_params(labelsize=7)
        ax.set_ylabel(c, rotation=0, ha="right", va="center", fontsize=8,
                      fontweight="bold" if c in record["predicted"] else "normal")
        if i < len(CLASSES) - 1:
            ax.tick_params(labelbottom=False)
    first.set_xlim(0.5, length + 0.5)
    ax.set_xlabel("residue", fontsize=8)
    fig.text(0.015, 0.51, "residue probability", rotation=90, ha="left", va="center", fontsize=8)
    fig.text(0.015, 0.015, CAPTION, ha="left", va="bottom", fontsize=7, color="#444444")
    bars = fig.add_subplot(grid[:, 1])
    probs = [record["probabilities"][c] for c in CLASSES]
    rows = np.arange(len(CLASSES))[::-1]
    bars.barh(rows, probs, color=[COLORS[i] if c in record["predicted"] else "#bbbbbb" for i, c in enumerate(CLASSES)])
    bars.scatter(thresholds, rows, marker="|", s=120, color="black", label="threshold")
    raw = record.get("probabilities_uncalibrated")  # calibrated bars: the calls compare these with the thresholds
    if raw is not None:
        bars.scatter([raw[c] for c in CLASSES], rows - 0.3, marker="o", s=14, facecolors="none", edgecolors="black",
                     label="uncalibrated")  # below the bar's centre, clear of its label
    for row, p in zip(rows, probs):  # beside the axis, where no bar, threshold tick or circle can be
        bars.text(1.02, row, f"{p:.3f}", transform=bars.get_yaxis_transform(), va="center", ha="left", fontsize=7)
    bars.set_yticks(rows)
    bars.set_yticklabels(CLASSES, fontsize=8)
    bars.set_xlim(0, 1.03)  # room for a circle at 1
    bars.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1])
    bars.set_xlabel("calibrated probability" if raw is not None else "probability", fontsize=8)
    bars.tick_params(labelsize=7)
    bars.legend(fontsize=7, loc="lower right")
    predicted = ", ".join(record["predicted"]) or NO_SIGNAL
    name = record["id"] if len(record["id"]) <= TITLE_ID_CHARS else record["id"][:TITLE_ID_CHARS - 3] + "..."
    title = f"{name}  ({length} residues; predicted: {predicted})"
    if "prediction_set" in record:
        ps = record["prediction_set"]
        title += f"; {ps['coverage']:g} set: {{{', '.join(ps['classes'])}}}"
    if centroid is not None:
        title += f"\ncentroid prediction ({centroid['space']}, {centroid['rule']}): {', '.join(centroid['predicted']) or NO_SIGNAL}"
    fig.suptitle(plain(title), fontsize=10)
    fig.savefig(path, format="png", dpi=90)
