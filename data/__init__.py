"""Bundled datasets and generators: recipes name them instead of a file or a hub dataset.

    >>> import data
    >>> rows = data.load("arithmetic_eval")
    >>> rows[0]["prompt"], rows[0]["answer"]          # doctest: +SKIP
    ('What is 63 + 18?', '81')

Names (`data.NAMES`): `arithmetic` (training problems), `arithmetic_eval` (held-out problems:
other split, other seed), `arithmetic_pairs` (preference pairs: correct vs wrong final answer),
`arithmetic_copy_pairs` (right working, final answer contradicting it), `arithmetic_mixed_pairs`
(half of each kind),
`safety_prompts` (labelled harmful and benign prompts), `safety_prompts_train` / `safety_prompts_eval`
(the same, split by a hash of the text: one in three held out), `demo_prompts` (the arithmetic problems
with the training split of the safety prompts spread among them: the demo's policy prompts), `shape_colours` /
`shape_colours_eval` (images: the colour of a drawn shape, for the vision demo). Each is a list of dict rows.
"""

from __future__ import annotations

import difflib
from typing import Callable

from posttrain.errors import UserError

from . import arithmetic as _arithmetic
from . import shapes as _shapes
from .safety import load_safety_prompts, safety_split

def demo_prompts() -> list[dict]:
    """Policy prompts for the demo: the arithmetic problems (math reward, `answer`) with the training split
    of the labelled safety prompts (safety reward, `harmful`/`category`) spread evenly among them."""
    math_rows, safety_rows = _arithmetic.arithmetic(), safety_split(load_safety_prompts(), "train")
    every = max(1, len(math_rows) // len(safety_rows))
    out = []
    for i, row in enumerate(math_rows):
        out.append(row)
        if i % every == every - 1 and i // every < len(safety_rows):
            out.append(safety_rows[i // every])
    return out


BUNDLED: dict[str, Callable[[], list[dict]]] = {
    "arithmetic": _arithmetic.arithmetic,
    "arithmetic_eval": _arithmetic.arithmetic_eval,
    "arithmetic_pairs": _arithmetic.arithmetic_pairs,
    "arithmetic_copy_pairs": _arithmetic.arithmetic_copy_pairs,
    "arithmetic_mixed_pairs": _arithmetic.arithmetic_mixed_pairs,
    "safety_prompts": load_safety_prompts,
    "safety_prompts_train": lambda: safety_split(load_safety_prompts(), "train"),
    "safety_prompts_eval": lambda: safety_split(load_safety_prompts(), "eval"),
    "demo_prompts": demo_prompts,
    "shape_colours": _shapes.shape_colours,
    "shape_colours_eval": _shapes.shape_colours_eval,
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
