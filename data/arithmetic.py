"""Small arithmetic and GSM-style word problems with exact integer answers, generated from a seed.

    >>> rows = generate(3, seed=0)
    >>> sorted(rows[0])
    ['answer', 'kind', 'prompt', 'response', 'solution']
    >>> rows == generate(3, seed=0)
    True

Each row: `prompt` (the bare problem), `answer` (the integer as text, the math reward's
`answer` column), `solution` (a worked line ending in the fixed answer format, `Answer: 72`),
`response` (the same solution: rows are prompt/response pairs a distillation or SFT stage reads)
and `kind`. The mix is chosen so the 270M base model is neither at 0 % nor at 100 %. Measured
on the embedded Gemma 3 270M, greedy, prompted with the demo recipe's three worked examples
(its teacher context): two-digit addition 12 %, two-digit subtraction 8 %, one-digit times
two-digit 13 %, word problems 4 % (200 held-out problems of these four kinds, 9 % overall),
and the one-digit times table (`table`, 36 problems) 92 %, which keeps some easy rewards in
each batch: about 13 % expected on `arithmetic_eval`.
With the bare problem in the chat template, the base model answers nothing (0 %): the
distillation stage teaches it the format first.

Held-out split: every problem text belongs to exactly one split by a hash of its text (about
10 % of all possible problems are "eval"), so the train and eval sets are disjoint whatever
their seeds and sizes. `arithmetic_pairs` are preference pairs (prompt, chosen, rejected) whose
rejected solution ends in a plausible wrong answer (off by one or ten, digits swapped, wrong
operation); in `arithmetic_copy_pairs` the rejected working is right and only its final answer is
wrong, a contradiction a small reward model can learn to see in a few hundred pairs.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Literal

ANSWER_FORMAT = "Answer: <number>"
INSTRUCTION = 'Solve the problem and end with "Answer: <number>".'
EVAL_SHARE = 10  # one problem in EVAL_SHARE (by hash) is held out

Split = Literal["train", "eval"]

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Liam",
          "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
_PRONOUN = {n: ("She" if n in {"Ava", "Chloe", "Emma", "Grace", "Ines", "Kira", "Maya", "Olga", "Priya",
                               "Rosa", "Tara"} else "He") for n in _NAMES}
_ITEMS = ["apples", "stickers", "marbles", "pencils", "cookies", "cards", "books", "stamps", "shells", "coins"]


def split_of(prompt: str) -> Split:
    """Which split a problem text belongs to (stable across runs, machines and Python versions)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_SHARE == 0 else "train"


# Each maker draws numbers and returns (prompt, worked steps, answer).
def _add(r: random.Random) -> tuple[str, str, int]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b


def _sub(r: random.Random) -> tuple[str, str, int]:
    a, b = sorted((r.randint(10, 99), r.randint(10, 99)), reverse=True)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", a - b


def _mul(r: random.Random) -> tuple[str, str, int]:
    a, b = r.randint(2, 9), r.randint(11, 49)
    return f"What is {a} * {b}?", f"{a} * {b} = {a * b}.", a * b


def _table(r: random.Random) -> tuple[str, str, int]:
    a, b = r.randint(2, 9), r.randint(2, 9)
    return f"What is {a} * {b}?", f"{a} * {b} = {a * b}.", a * b


def _word(r: random.Random) -> tuple[str, str, int]:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    he = _PRONOUN[name]
    kind = r.randrange(6)
    if kind == 0:
        a, b = r.randint(5, 60), r.randint(5, 40)
        return (f"{name} has {a} {item}. {he} gets {b} more. How many {item} does {name} have now?",
                f"{a} + {b} = {a + b}.", a + b)
    if kind == 1:
        a = r.randint(20, 90)
        b = r.randint(3, a - 1)
        return (f"{name} had {a} {item} and gave away {b}. How many {item} does {name} have left?",
                f"{a} - {b} = {a - b}.", a - b)
    if kind == 2:
        a, b = r.randint(2, 12), r.randint(2, 9)
        return (f"A box holds {a} {item}. How many {item} are in {b} boxes?", f"{a} * {b} = {a * b}.", a * b)
    if kind == 3:
        a, b = r.randint(2, 9), r.randint(3, 12)
        c = r.randint(1, a * b - 1)
        return (f"{name} buys {a} packs of {item} with {b} in each pack, then gives away {c}. "
                f"How many {item} does {name} have?", f"{a} * {b} = {a * b}. {a * b} - {c} = {a * b - c}.", a * b - c)
    if kind == 4:
        a, b, c = r.randint(40, 99), r.randint(5, 20), r.randint(5, 15)
        return (f"{name} has {a} dollars, spends {b} dollars on lunch and {c} dollars on a book. "
                f"How many dollars are left?", f"{a} - {b} = {a - b}. {a - b} - {c} = {a - b - c}.", a - b - c)
    groups, each = r.randint(2, 9), r.randint(2, 12)
    total = groups * each
    return (f"{total} students are split equally into {groups} groups. How many students are in each group?",
            f"{total} / {groups} = {each}.", each)


_MAKERS: list[tuple[Callable[[random.Random], tuple[str, str, int]], str, int]] = [
    (_add, "add", 3), (_sub, "sub", 2), (_mul, "mul", 2), (_table, "table", 1), (_word, "word", 2),  # (maker, kind, weight)
]


def _draw(r: random.Random) -> tuple[str, str, int, str]:
    maker, kind, _ = r.choices(_MAKERS, weights=[w for *_, w in _MAKERS])[0]
    prompt, steps, answer = maker(r)
    return prompt, steps, answer, kind


def generate(n: int, seed: int = 0, split: Split = "train") -> list[dict]:
    """`n` distinct problems of one split, deterministic in (n, seed, split)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    r = random.Random(f"arithmetic-{seed}-{split}")
    rows, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(rows) == n:
            break
        prompt, steps, answer, kind = _draw(r)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        solution = f"{steps} Answer: {answer}"
        rows.append({"prompt": prompt, "answer": str(answer), "solution": solution, "response": solution,
                     "kind": kind})
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} distinct {split} problems found for n={n}")
    return rows


def _wrong(r: random.Random, answer: int) -> int:
    """A plausible wrong answer: off by one or ten, digits swapped, or a near miss."""
    candidates = [answer + 1, answer - 1, answer + 10, answer - 10, int(str(answer)[::-1]), answer + r.randint(2, 9)]
    candidates = [c for c in candidates if c != answer and c >= 0]
    return r.choice(candidates)


def generate_pairs(n: int, seed: int = 0, split: Split = "train", consistent: bool | float = True) -> list[dict]:
    """Preference pairs: `chosen` is the worked solution, `rejected` ends in a wrong answer.

    consistent: the rejected working line shows the wrong result too (judging it takes arithmetic);
    else the working is right and only the final `Answer:` differs from it (a copy error: judging
    it takes comparing two numbers in the text). A float is the share of consistent pairs, each pair
    drawn at random (its `consistent` column says which it is)."""
    tag = "" if consistent is True else "-copy" if consistent is False else f"-mixed{consistent}"
    r = random.Random(f"arithmetic-pairs-{seed}{tag}")
    pairs = []
    for row in generate(n, seed=seed, split=split):
        right = int(row["answer"])
        wrong = _wrong(r, right)
        steps = row["solution"].rsplit(" Answer:", 1)[0]
        last = steps.rsplit("= ", 1)
        hard = consistent if isinstance(consistent, bool) else r.random() < consistent
        rejected_steps = f"{last[0]}= {wrong}." if len(last) == 2 and hard else steps
        pairs.append({"prompt": row["prompt"], "chosen": row["solution"],
                      "rejected": f"{rejected_steps} Answer: {wrong}", "answer": row["answer"],
                      "consistent": hard})
    return pairs


def arithmetic(n: int = 2000) -> list[dict]:
    """The training problems (`data: {train: arithmetic}`)."""
    return generate(n, seed=0, split="train")


def arithmetic_eval(n: int = 512) -> list[dict]:
    """Held-out problems: the eval split, another seed; no prompt is shared with `arithmetic`."""
    return generate(n, seed=1, split="eval")


def arithmetic_pairs(n: int = 1000) -> list[dict]:
    """Preference pairs for reward-model training, from the train split."""
    return generate_pairs(n, seed=2, split="train")


def arithmetic_copy_pairs(n: int = 1000) -> list[dict]:
    """Preference pairs whose rejected answer contradicts its own (right) working, train split."""
    return generate_pairs(n, seed=3, split="train", consistent=False)


def arithmetic_mixed_pairs(n: int = 1000) -> list[dict]:
    """Half copy pairs (the rejected answer contradicts its working), half consistent ones (the
    rejected working is wrong too), train split: a reward model sees the first kind and has to
    calculate for the second, so the 270M's accuracy sits between chance and 1 (WARM's demo set)."""
    return generate_pairs(n, seed=4, split="train", consistent=0.5)
