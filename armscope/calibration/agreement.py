"""How far a reduced-precision bundle's outputs agree with its FP32 reference, and
the deployability gate on that agreement: the numbers ``armscope accuracy`` reports
and ``armscope quantize`` gates on, apart from running bundles and drawing charts
so both use exactly the same definitions.

* top-1 agreement and max/mean |delta p| of the ensemble probabilities;
* decisions flipped at the manifest's clinical threshold (binary/cascade
  tasks), positive -> negative flips first: a missed positive is the costly
  error the paper's 0.3 threshold exists to avoid;
* AUC of both bundles when labels are given;
* the overlay: Pearson correlation of the Grad-CAM of the reference's decided
  class, and IoU of the AI-focused regions (``armscope.core.overlay.focus_mask``, cells
  above the median), per image and summarised.
"""
from __future__ import annotations

import numpy as np

from armscope.core.decision import decide
from armscope.core.overlay import focus_mask

MIN_AGREEMENT = 0.99  # top-1 agreement a deployable reduced-precision bundle must reach
# Mean Pearson r between its Grad-CAMs and FP32's: the heat map is what the pathologist sees,
# and agreeing labels can come with a different map (random-weight INT8 on saturating CPU
# kernels: 100% agreement, CAM r 0.73). Mean, not min: a near-flat 20x20 CAM's r is noise.
MIN_CAM_PEARSON = 0.95


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC by the rank formula (Mann-Whitney U / (n_pos * n_neg)): the chance that a
    positive image scores above a negative one, ties counting half; None without both classes.
    Tied scores share their mean rank, which is what makes ties count half. Checked against
    scikit-learn's ``roc_auc_score`` in the tests; sklearn itself is not a runtime dependency."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, tie_group, tie_sizes = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(tie_sizes)                         # 1-based rank of each group's last member
    mean_rank = last_rank - (tie_sizes - 1) / 2.0            # the group's ranks are last-size+1 .. last
    ranks = mean_rank[tie_group.ravel()]
    u_positive = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_positive / (n_pos * n_neg))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two maps (numpy's ``corrcoef``). A constant map has no r: two equal
    constant maps count as agreeing (1.0), anything else as not (0.0), so a flat CAM
    neither passes nor fails the gate by a NaN."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # exactly constant (a std can come out 1e-17 for one)
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare_outputs(ref: dict, cand: dict, task: dict, names: list[str],
                    labels: list[str] | None = None) -> dict:
    """Per-image rows and a summary (see module docstring)."""
    classes = task["classes"]
    binary = task["type"] in ("binary", "cascade")
    rows = []
    for i, name in enumerate(names):
        p_ref, p_cand = ref["probs"][i], cand["probs"][i]
        d_ref, d_cand = decide(p_ref, task), decide(p_cand, task)
        c = d_ref["index"]
        cam_ref, cam_cand = ref["cam"][i, c], cand["cam"][i, c]
        row = {
            "image": str(name),
            "label": labels[i] if labels else None,
            "ref_probs": [round(float(v), 6) for v in p_ref],
            "cand_probs": [round(float(v), 6) for v in p_cand],
            "max_abs_delta_p": float(np.max(np.abs(p_ref - p_cand))),
            "top1_ref": classes[int(np.argmax(p_ref))],
            "top1_cand": classes[int(np.argmax(p_cand))],
            "decision_ref": d_ref["label"],
            "decision_cand": d_cand["label"],
            "cam_class": classes[c],
            "cam_pearson": pearson(cam_ref, cam_cand),
            "cam_iou": iou(focus_mask(cam_ref), focus_mask(cam_cand)),
        }
        row["top1_agree"] = row["top1_ref"] == row["top1_cand"]
        if binary:
            row["flip"] = ("positive->negative" if d_ref["positive"] and not d_cand["positive"] else
                           "negative->positive" if d_cand["positive"] and not d_ref["positive"] else None)
        else:
            row["flip"] = f"{d_ref['label']}->{d_cand['label']}" if d_ref["label"] != d_cand["label"] else None
        rows.append(row)

    delta = np.abs(ref["probs"] - cand["probs"])
    flips = [r for r in rows if r["flip"]]
    flips.sort(key=lambda r: (r["flip"] != "positive->negative", r["image"]))
    pearsons = np.array([r["cam_pearson"] for r in rows])
    ious = np.array([r["cam_iou"] for r in rows])
    summary = {
        "n_images": len(rows),
        "top1_agreement": float(np.mean([r["top1_agree"] for r in rows])),
        "max_abs_delta_p": float(delta.max()),
        "mean_abs_delta_p": float(delta.mean()),
        "threshold": float(task["threshold"]) if binary else None,
        "positive_class": task.get("positive_class") if binary else None,
        "decision_flips": len(flips),
        "positive_to_negative_flips": sum(r["flip"] == "positive->negative" for r in flips),
        "negative_to_positive_flips": sum(r["flip"] == "negative->positive" for r in flips),
        "flipped_images": [{"image": r["image"], "flip": r["flip"]} for r in flips],
        "cam_pearson_mean": float(pearsons.mean()),
        "cam_pearson_min": float(pearsons.min()),
        "cam_iou_mean": float(ious.mean()),
        "cam_iou_min": float(ious.min()),
    }
    if labels:
        y = np.array([classes.index(label) for label in labels])
        if binary:
            pos = classes.index(task["positive_class"])
            summary["auc_ref"] = auc(ref["probs"][:, pos], y == pos)
            summary["auc_cand"] = auc(cand["probs"][:, pos], y == pos)
        else:
            per = [(auc(ref["probs"][:, k], y == k), auc(cand["probs"][:, k], y == k)) for k in range(len(classes))]
            per = [p for p in per if p[0] is not None]
            summary["auc_ref"] = float(np.mean([p[0] for p in per])) if per else None
            summary["auc_cand"] = float(np.mean([p[1] for p in per])) if per else None
        summary["labelled"] = len(labels)
    return {"summary": summary, "images": rows}


def gate(summary: dict, min_agreement: float = MIN_AGREEMENT, min_cam_pearson: float = MIN_CAM_PEARSON) -> list[str]:
    """Reasons a candidate must not be marked deployable (empty list: it may)."""
    reasons = []
    if summary["top1_agreement"] < min_agreement:
        reasons.append(f"top-1 agreement {summary['top1_agreement']:.2%} < {min_agreement:.0%}")
    if summary["cam_pearson_mean"] < min_cam_pearson:
        reasons.append(f"Grad-CAM Pearson r vs FP32, mean {summary['cam_pearson_mean']:.3f} < {min_cam_pearson}")
    if summary["positive_to_negative_flips"]:
        reasons.append(f"{summary['positive_to_negative_flips']} positive->negative decision flip(s) at "
                       f"threshold {summary['threshold']}")
    return reasons
