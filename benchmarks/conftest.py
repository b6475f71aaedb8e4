"""Benchmark fixtures. The full-size ensemble (5 x DenseNet-121, random
weights: speed does not depend on the weights) is exported once and cached in
benchmarks/.cache, since tf2onnx needs minutes per DenseNet-121 member."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from armscope.core.cpus import cpu_name, usable_cpus

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CACHE = Path(__file__).resolve().parent / ".cache"
FULL_MEMBERS = 5


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cpu_model"] = cpu_name()
    machine_info["cores"] = os.cpu_count()
    # what the runs could use: fewer than "cores" when pinned (taskset, CPUAffinity=)
    machine_info["usable_cpus"] = usable_cpus()


def ensure_full_members() -> list[Path]:
    """5 DenseNet-121 tiled members saved as .keras (cached)."""
    import keras

    from armscope.export.architecture import ArchitectureSpec, build_tiled_model

    folder = CACHE / "densenet121_members"
    paths = [folder / f"member_{i}.keras" for i in range(FULL_MEMBERS)]
    if not all(p.is_file() for p in paths):
        folder.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(paths):
            keras.utils.set_random_seed(i)
            build_tiled_model(ArchitectureSpec("densenet121", 2)).save(path)
    return paths


def ensure_full_bundle() -> Path:
    from armscope.export.onnx_export import TaskSpec, export_bundle

    target = CACHE / "densenet121_x5_bundle"
    if not (target / "manifest.json").is_file():
        export_bundle(ensure_full_members(), target, TaskSpec("binary", ["other", "IIM"], "IIM", 0.3),
                      name="densenet121-x5-random", force=True, jobs=os.cpu_count() or 1)
    return target


@pytest.fixture(scope="session")
def full_members():
    pytest.importorskip("tensorflow")
    return ensure_full_members()


@pytest.fixture(scope="session")
def full_bundle(full_members):
    from armscope.core.bundle import load_bundle

    return load_bundle(ensure_full_bundle())
