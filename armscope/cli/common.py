"""Argument types and output checks shared by the ``armscope`` subcommands."""
from __future__ import annotations

from armscope.core.argtypes import number
from armscope.core.errors import ArmscopeError, output_file_problem


def int_in(lo: int, hi: float = float("inf")):
    return number(lo, hi, integer=True)


def check_output_file(path, option: str) -> None:
    if path and (problem := output_file_problem(path)) is not None:
        raise ArmscopeError(f"{option} {path}: {problem}")


def check_out_apart(out, inputs, option: str = "--out") -> None:
    """``armscope.core.bundle.check_out_apart``, imported when a command runs (it brings OpenCV and jsonschema)."""
    from armscope.core.bundle import check_out_apart as check

    check(out, inputs, option)


THREADS = int_in(1, 256)
SEED = int_in(0, 2**32 - 1)


def crop_size(text: str) -> int:
    """--crop: 0 (no crop: whole images) or 16..16384 pixels."""
    return 0 if text.strip() == "0" else int_in(16, 16384)(text)
