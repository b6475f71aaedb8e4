"""The accuracy report's charts, drawn with matplotlib (the optional ``plots`` extra,
``pip install 'armscope[plots]'``): the report's numbers do not need it, so a base
install (a Jetson) still writes report.md/json/csv and says in one line that the
charts were left out.

Only matplotlib's object-oriented ``Figure`` API is used (no pyplot): nothing global
(backend, open figures) changes in the process that writes a report.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from armscope.core.overlay import focus_mask, normalise

CHARTS = ("probs_scatter.png", "delta_p.png", "cam_agreement.png", "cam_worst.png")
MISSING_NOTE = "charts skipped: matplotlib is not installed (pip install 'armscope[plots]')"


def matplotlib_missing() -> str | None:
    """None when the charts can be drawn, else the one-line note that says why not."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return MISSING_NOTE
    return None


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def probs_scatter(ref: np.ndarray, cand: np.ndarray, class_name: str, threshold: float | None):
    """Each image's probability of ``class_name``, reference (x) against candidate (y):
    on the diagonal where they agree; the threshold lines show which side each decision fell."""
    fig = _figure(5.5, 5.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=1, label="agreement")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linewidth=1, label=f"threshold {threshold:g}")
        ax.axhline(threshold, color="tab:red", linewidth=1)
    ax.scatter(ref, cand, s=24, color="tab:blue", zorder=3)
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="reference", ylabel="candidate",
           title=f"p({class_name}): reference vs candidate")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def per_image_bars(series: dict[str, list[float]], title: str, ymax: float | None = None):
    """Grouped bars, one group per image (in report order), one colour per series."""
    n = max(len(v) for v in series.values())
    fig = _figure(max(6.0, 0.25 * n * len(series) + 1.5), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(n)
    for k, (name, values) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set(xlabel="image (report order)", title=title, xlim=(-0.6, n - 0.4))
    if ymax is not None:
        ax.set_ylim(0, ymax)
    if n <= 40:
        ax.set_xticks(x)
    ax.legend(fontsize="small")
    return fig


def cam_pair(cam_ref: np.ndarray, cam_cand: np.ndarray, title: str):
    """The two Grad-CAMs side by side (each scaled to its own range, as the eyepiece shows
    them), with the focus region (cells above the median) outlined."""
    fig = _figure(7.0, 3.8)
    axes = fig.subplots(1, 2)
    for ax, cam, name in zip(axes, (cam_ref, cam_cand), ("reference", "candidate")):
        ax.imshow(normalise(cam), cmap="jet", vmin=0, vmax=1, interpolation="bilinear")
        ax.contour(focus_mask(cam).astype(float), levels=[0.5], colors="white", linewidths=1.5)
        ax.set(title=name, xticks=[], yticks=[])
    fig.suptitle(title, fontsize="medium")
    return fig


def write_charts(out_dir: Path, report: dict, ref_out: dict, cand_out: dict, task: dict) -> list[str]:
    """The four charts as PNGs in ``out_dir``; returns their file names (call
    ``matplotlib_missing()`` first: this needs matplotlib)."""
    classes = task["classes"]
    binary = task["type"] in ("binary", "cascade")
    pos = classes.index(task["positive_class"]) if binary else int(np.argmax(ref_out["probs"].mean(axis=0)))
    rows = report["images"]
    worst = int(np.argmin([r["cam_pearson"] for r in rows]))
    c = classes.index(rows[worst]["cam_class"])
    figures = {
        "probs_scatter.png": probs_scatter(ref_out["probs"][:, pos], cand_out["probs"][:, pos], classes[pos],
                                           report["summary"]["threshold"]),
        "delta_p.png": per_image_bars({"max |dp|": [r["max_abs_delta_p"] for r in rows]}, "max |delta p| per image"),
        "cam_agreement.png": per_image_bars({"CAM r": [r["cam_pearson"] for r in rows],
                                             "focus IoU": [r["cam_iou"] for r in rows]},
                                            "Grad-CAM agreement per image", ymax=1.0),
        "cam_worst.png": cam_pair(ref_out["cam"][worst, c], cand_out["cam"][worst, c],
                                  f"lowest CAM r {rows[worst]['cam_pearson']:.3f}: {Path(rows[worst]['image']).name}"),
    }
    for name, fig in figures.items():
        fig.savefig(Path(out_dir) / name)
    return list(figures)
