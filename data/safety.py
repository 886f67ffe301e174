"""The labelled safety prompts (data/safety_prompts.jsonl): harmful ones by hazard category, and
benign ones, many of which only look alarming ("how do I kill a python process"), to measure
over-refusal.

    >>> rows = load_safety_prompts()
    >>> sorted(rows[0])
    ['category', 'harmful', 'looks_like', 'prompt']

Row keys: `prompt`; `harmful` (bool); `category` (S1-S14, the Llama Guard hazard code, for
harmful rows; None for benign); `looks_like` (the category a benign prompt could be mistaken
for, or None). The columns `harmful` and `category` are what the safety reward reads. Written
for this project: every category has at least three harmful prompts.

Splits: `safety_split(rows, "train" | "eval")` keeps the prompts whose text hashes to that split (one in
three is held out: 35 of the 86, 18 harmful and 17 benign), so the demo's policy never trains on the
prompts its held-out refusal rates are measured on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from posttrain.errors import UserError
from rewards.safety import HAZARD_CATEGORIES

SAFETY_PROMPTS = Path(__file__).resolve().parent / "safety_prompts.jsonl"
EVAL_SHARE = 3  # one prompt in EVAL_SHARE (by a hash of its text) is held out


def safety_split(rows: list[dict], split: Literal["train", "eval"]) -> list[dict]:
    """The rows of one split: a prompt is "eval" when the hash of its text is 0 mod EVAL_SHARE."""
    def held(row: dict) -> bool:
        return int.from_bytes(hashlib.sha256(row["prompt"].encode()).digest()[:8], "big") % EVAL_SHARE == 0
    return [r for r in rows if held(r) == (split == "eval")]


def load_safety_prompts(path: str | Path = SAFETY_PROMPTS) -> list[dict]:
    """Rows of a safety prompt file, checked: each error names the line, the rule and the fix."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{where}: needs a non-empty string 'prompt'")
        if not isinstance(row.get("harmful"), bool):
            raise UserError(f"{where}: 'harmful' must be true or false, got {row.get('harmful')!r}")
        category = row.get("category")
        if row["harmful"] and category not in HAZARD_CATEGORIES:
            raise UserError(f"{where}: a harmful prompt needs 'category' in S1-S14, got {category!r}")
        if not row["harmful"] and category is not None:
            raise UserError(f"{where}: a benign prompt has category null (use 'looks_like' for the "
                            f"category it resembles), got {category!r}")
        looks_like = row.get("looks_like")
        if looks_like is not None and looks_like not in HAZARD_CATEGORIES:
            raise UserError(f"{where}: 'looks_like' must be S1-S14 or null, got {looks_like!r}")
        rows.append({"prompt": row["prompt"], "harmful": row["harmful"], "category": category,
                     "looks_like": looks_like})
    return rows
