"""Bundled datasets and generators: recipes name them instead of a file or a hub dataset.

    >>> import data
    >>> rows = data.load("arithmetic_eval")
    >>> rows[0]["prompt"], rows[0]["answer"]          # doctest: +SKIP
    ('What is 63 + 18?', '81')

Names (`data.NAMES`): `arithmetic` (training problems), `arithmetic_eval` (held-out problems:
other split, other seed), `arithmetic_pairs` (preference pairs: correct vs wrong final answer),
`arithmetic_copy_pairs` (right working, final answer contradicting it),
`safety_prompts` (labelled harmful and benign prompts). Each is a list of dict rows.
"""

from __future__ import annotations

import difflib
from typing import Callable

from posttrain.errors import UserError

from . import arithmetic as _arithmetic
from .safety import load_safety_prompts

BUNDLED: dict[str, Callable[[], list[dict]]] = {
    "arithmetic": _arithmetic.arithmetic,
    "arithmetic_eval": _arithmetic.arithmetic_eval,
    "arithmetic_pairs": _arithmetic.arithmetic_pairs,
    "arithmetic_copy_pairs": _arithmetic.arithmetic_copy_pairs,
    "safety_prompts": load_safety_prompts,
}
NAMES = tuple(BUNDLED)


def load(name: str) -> list[dict]:
    """The rows of a bundled dataset; an unknown name is a UserError listing the valid ones."""
    if name not in BUNDLED:
        close = difflib.get_close_matches(name, NAMES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown bundled dataset '{name}'; {hint}bundled: {', '.join(NAMES)}")
    return BUNDLED[name]()


__all__ = ["BUNDLED", "NAMES", "load", "load_safety_prompts"]
