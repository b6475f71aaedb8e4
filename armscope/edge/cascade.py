"""The paper's two-step diagnosis: step one decides (IIM vs other at 0.3, so no
IIM is missed), then the bundle that the decided class selects classifies the
same field (IIM -> 4 subtypes; other -> 7 hereditary myopathies).

A cascade bundle is step one's bundle whose manifest has ``task.type:
cascade`` and ``task.steps``: ``[{"when": CLASS, "bundle": RELATIVE_DIR}]``,
each step a complete bundle of its own (``armscope cascade`` assembles one
from existing bundles). ``classify``, the daemon and ``armscope cascade`` read
steps here only, so they agree on what a valid cascade is and on what the
second step reports.

Why the steps must share step one's preprocessing: the daemon and
``classify`` preprocess a field once and hand the same (1, S, S, 3) batch
to step two. A step trained on another crop, input size S or channel order
would get input it was not trained on (or cannot take) and answer confidently
anyway, so that is refused when the bundle is loaded, naming the step. The
steps may differ in everything else: tiled or whole-image, CAM size, classes.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from armscope.core.bundle import (MANIFEST, Bundle, check_out_apart, load_bundle, require_deployable, staged_directory,
                             write_manifest)
from armscope.core.errors import ArmscopeError
from armscope.core.decision import decide


def model_id(bundle: Bundle) -> str:
    """``name@sha256-prefix`` of the bundle's merged graph: what headers and records name a model by."""
    return f"{bundle.manifest['name']}@{bundle.manifest['ensemble']['sha256'][:12]}"


@dataclass(frozen=True)
class Step:
    """One second step: the step-one class that selects it and its bundle."""

    when: str
    bundle: Bundle

    def result(self, probs: np.ndarray) -> dict:
        """What the second step reports for one field (or a slide's mean):
        the header's and the records' ``subtype`` object, JSON-ready."""
        decision = decide(probs, self.bundle.task)
        return {"when": self.when, "model_id": model_id(self.bundle), "classes": self.bundle.classes,
                "probs": [round(float(p), 6) for p in probs],
                "decision": {k: (round(float(v), 6) if k in ("score", "threshold") else v) for k, v in decision.items()}}


def load_steps(bundle: Bundle) -> dict[str, Step]:
    """The second steps of a cascade bundle by step-one class (``{}`` for
    binary and multiclass bundles), each loaded, hash-verified and checked.

    Refused, naming the manifest field: a step whose ``when`` is not one of
    step one's classes or repeats one, a step bundle that is missing, invalid
    or failed its accuracy gate, a step that is itself a cascade (the paper
    has two steps; deeper trees are not supported), and a step whose
    preprocessing differs from step one's (see the module docstring)."""
    task = bundle.task
    where = bundle.root / MANIFEST
    if task["type"] != "cascade":
        if task.get("steps"):
            raise ArmscopeError(f"{where}: field task.steps: only cascade tasks have steps, task.type is {task['type']!r}")
        return {}
    steps: dict[str, Step] = {}
    for i, entry in enumerate(task["steps"]):
        field = f"task.steps.{i}"
        when = entry["when"]
        if when not in bundle.classes:
            raise ArmscopeError(f"{where}: field {field}.when: {when!r} is not one of step one's classes {bundle.classes}")
        if when in steps:
            raise ArmscopeError(f"{where}: field {field}.when: a step for {when!r} is already given")
        try:
            sub = require_deployable(load_bundle(bundle.root / entry["bundle"]))
        except ArmscopeError as exc:
            raise ArmscopeError(f"{where}: field {field}.bundle: {exc}") from None
        if sub.task["type"] == "cascade":
            raise ArmscopeError(f"{where}: field {field}.bundle: {sub.root} is itself a cascade; "
                                "a step must be a binary or multiclass bundle")
        if sub.preprocessing != bundle.preprocessing:
            raise ArmscopeError(
                f"{where}: field {field}.bundle: {sub.root} preprocesses as {sub.preprocessing}, step one as "
                f"{bundle.preprocessing}; a cascade's steps classify the same preprocessed field, so they must match")
        steps[when] = Step(when, sub)
    return steps


class SubtypeMeans:
    """Slide-level second steps: per step, the mean of its probabilities over
    the fields that step one sent to it (the paper averages a slide's images;
    a field step one did not send there has no second-step answer).

    Not thread-safe: the caller holds its own lock."""

    def __init__(self, steps: dict[str, Step]):
        self.steps = steps
        self._sum = {when: np.zeros(len(s.bundle.classes)) for when, s in steps.items()}
        self._n = dict.fromkeys(steps, 0)

    def add(self, when: str, probs) -> None:
        self._sum[when] += np.asarray(probs, dtype=np.float64)
        self._n[when] += 1

    def counts(self) -> dict[str, int]:
        return dict(self._n)

    def result(self, when: str | None) -> dict | None:
        """The ``subtype`` object for a slide whose step-one decision is
        ``when``, with ``n_fields``; None if ``when`` has no step or no field
        went there."""
        if when not in self.steps or not self._n[when]:
            return None
        return {**self.steps[when].result(self._sum[when] / self._n[when]), "n_fields": self._n[when]}


def parse_steps(items: list[str], option: str = "--then") -> dict[str, Path]:
    """``CLASS=BUNDLE_DIR`` items -> {class: bundle directory} for ``assemble``, one step per class."""
    then: dict[str, Path] = {}
    for item in items:
        when, sep, path = item.partition("=")
        if not sep or not when or not path:
            raise ArmscopeError(f"{option} {item!r}: expected CLASS=BUNDLE_DIR, e.g. {option} IIM=bundles/iim-subtypes")
        if when in then:
            raise ArmscopeError(f"{option} {item!r}: a step for {when!r} is already given")
        then[when] = Path(path)
    return then


def assemble(step_one: Path, then: dict[str, Path], out: Path, *, force: bool = False) -> Bundle:
    """``armscope cascade``: a self-contained cascade bundle at ``out``: a copy
    of the binary bundle ``step_one`` whose task becomes ``cascade``, with a
    copy of each ``then[class]`` bundle under ``steps/``. Every file keeps its
    hash; the result is loaded and checked with ``load_steps`` before it is
    renamed into place, so a cascade that would be refused later is never
    written."""
    first = load_bundle(step_one)
    if first.task["type"] != "binary":
        raise ArmscopeError(f"{first.root / MANIFEST}: field task.type: step one must be a binary bundle "
                            f"(a positive class and a threshold, as the paper's IIM-vs-other step), got {first.task['type']!r}")
    if not then:
        raise ArmscopeError("give at least one second step: --then CLASS=BUNDLE_DIR")
    out = Path(out).resolve()
    check_out_apart(out, [first.root, *then.values()])  # --force would delete an input
    with staged_directory(out, overwrite=force) as stage:
        shutil.copytree(first.root, stage, dirs_exist_ok=True)
        steps, used = [], set()
        for when, path in then.items():
            slug = re.sub(r"[^A-Za-z0-9._-]", "_", when).lstrip(".") or "step"
            while slug in used:
                slug += "_"
            used.add(slug)
            shutil.copytree(Path(path), stage / "steps" / slug)
            steps.append({"when": when, "bundle": f"steps/{slug}"})
        manifest = dict(first.manifest)
        manifest["task"] = {**first.task, "type": "cascade", "steps": steps}
        write_manifest(stage, manifest)
        bundle = load_bundle(stage)
        load_steps(bundle)  # the checks classify and the daemon make, before anything is in place
    return load_bundle(out)
