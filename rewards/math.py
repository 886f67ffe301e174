"""Math reward: extract the final answer, then check it against the reference with Math-Verify.

    >>> extract_answer("so 27 + 45 = 72. Answer: 72")
    Extracted(answer='72', source='answer')
    >>> extract_answer(r"The area is $\\boxed{\\frac{\\sqrt{3}}{4}}$.")
    Extracted(answer='\\\\frac{\\\\sqrt{3}}{4}', source='boxed')
    >>> extract_answer(r"The solutions are $\\boxed{(1, 2)}$ and $\\boxed{(2, 1)}$.")
    Extracted(answer='(1, 2), (2, 1)', source='boxed')

Extraction (here, in the trainer's process: regular expressions over the completion, no sympy).
The rules follow Math-Verify's parser (https://github.com/huggingface/Math-Verify, commit
5d148cfaaf99214c2e4ffb4bc497ab042c592a7a, `math_verify/parser.py` and latex2sympy2_extended's
`extract_boxed_content`) except where a deliberate difference is listed below:

- boxed: the last closed `\\boxed{...}` / `\\fbox{...}` (braces may nest) or `\\boxed 5`, with the
  boxes just before it that are under 10 characters away, or under 70 with `and`, `or`, `,` or `;`
  between them, joined by ", " into one answer: several boxes are one set or tuple
  (`\\boxed{1}, \\boxed{2}` -> `1, 2`), repeats dropped. Two boxed candidates are thus one answer
  that matches neither alone: no credit for hedging.
- markers: the last `#### x`, `Answer: x` or `The (final) answer is x`, x being the rest of its line
  (the next line if that is empty) to the end of its sentence. Math parts joined by `and`/`or`/`,`
  are one answer (`$12$ and $13$` -> `12, 13`, `x = 3 or x = -3` -> `x = 3, x = -3`); a sentence of
  words gives its last math or number (`Jane planted 3 trees today` -> `3`).
- the later statement wins: a marker after the last box replaces it (an intermediate value was
  boxed before "The final answer is ..."), unless only words follow the marker ("The answer is
  correct"); a box after its marker (`Answer: \\boxed{5}`) is the answer.
- else, unless `strict`: the last LaTeX math (`$...$` and `\\(...\\)` on one line, `$$...$$`,
  `\\[...\\]`, a bare `\\frac{1}{2}`; math just before it joined by `,`/`and`/`or`, up to 6 parts)
  or the last number, whichever ends later: source `last_math` or `last_number`.
- cleaning: `$`, `\\(`, `**`, quotes, a final full stop, and units or words after a number
  (`12 cm` -> `12`, `1,000.99m²` -> `1,000.99`) go; `1 000` -> `1000`; `28 percent` -> `28%`, and a
  percent sign or word right after a box or math is kept (`$\\boxed{28}$ percent` -> `28%`).

Deliberate differences from Math-Verify (measured in tests/test_math_verify_cases.py on its own cases):

- the last-number fallback (not under `strict`): a number outside LaTeX still counts when there is
  no box, marker or math (`Answer $<newline>9<newline>$` -> 9; Math-Verify limited to LaTeX finds none).
- a marker after the last box beats it, `Answer:` included; Math-Verify ranks a box above `Answer:`
  (and "final answer is" level with or above a box). The last statement is the answer
  ("Answer: 1. Wait, the answer is 2" -> 2), and a boxed intermediate value does not hide the final one.
- an unclosed `\\boxed{7` is not an answer (Math-Verify takes the rest of the text as its content).
- `2,74` (one comma, not a group of three) is checked both as 2.74 and as the list {2, 74}, in the
  completion and in the reference: Math-Verify reads it as a decimal in plain text and as a list in
  LaTeX, and which one was meant is not knowable. `1,000` is one thousand in both.
- `1 000` is a thousand in a box too (Math-Verify's LaTeX reads 1*000 = 0).
- the reference is read as LaTeX (wrapped in `$...$` unless it has `$` pairs or `\\boxed`), as
  datasets store box contents; Math-Verify's `parse` of a bare `x+1` would find the number 1.
- extraction settings Math-Verify tests per case (LaTeX-only or number-only extraction, boxed
  priority, `allow_set_relation_comp`) are not options here: the rules above are the reward's.

Equivalence (`check_equivalent`) runs Math-Verify's `parse` and `verify` in `WorkerPool`
processes: fractions, decimals, percent, thousands separators, sqrt forms, intervals with their
openness, sets, matrices, `x =` prefixes and LaTeX units. Math-Verify's own timeout uses
SIGALRM, which raises off the main thread and cannot interrupt a big integer power inside C
(`9**9**9**9` never returns); so each check has a hard deadline after which its worker is killed
and replaced, and workers have an address-space limit. Identical strings skip the worker.

Score per sample: 1.0 if the answer is equivalent to the reference, else 0.0 (no answer found
is a 0, the model's fault); plus `format_bonus` if the completion uses the required answer
format, minus `format_penalty` if it does not. None (sample skipped, counted) when the check
timed out or failed, or when the reference answer is missing.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from typing import Literal, NamedTuple, Optional, Sequence

from .base import time_left
from .workers import WorkerPool

# ----------------------------------------------------------------------------- extraction

# An integer part: 1,234,567 or 1 234 567 (groups of three), 2,74 (a decimal comma), 1234
_INTEGER = r"\d{1,3}(?:,\d{3})+(?![\d,])|\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?!\d)|\d+,\d+|\d+"
_PERCENT = r"\s*(?:%|\\%|percent(?:age)?\b|pct\b)"
# ... with decimals, .5, a fraction 3/4, a sign and a percent sign or word
_NUMBER = rf"[-+]?(?:(?:{_INTEGER})(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?(?:{_PERCENT})?"
_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}(?![.,]?\d)")
_LEADING_NUMBER_RE = re.compile(rf"^\\?\$?\s*({_NUMBER})(?:\s+[A-Za-z][A-Za-z ]*)?$")
_SPACED_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?![\d.,]?\d)")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+")
_DECIMAL_COMMA_RE = re.compile(r"[-+]?\d+,\d+%?")
_HASH_RE = re.compile(r"####")
_ANSWER_RE = re.compile(r"(?i)\banswer\s*(?:is\b|:)\s*:?")  # "Answer:", "The (final) answer is"
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
# LaTeX math: $$...$$ and \[...\] may span lines, $...$ and \(...\) may not (as in Math-Verify)
_MATH_RE = re.compile(
    r"(?<!\\)\$\$(?P<a>(?:[^$]|\$(?!\$))+?)(?<!\\)\$\$"
    r"|(?<!\\)\\\[(?P<b>(?:[^\\]|\\(?![\[\]]))+?)\\\]"
    r"|(?<![\\\d$])\$(?P<c>(?:\\\$|[^\n$])+?)(?<!\\)\$"
    r"|(?<!\\)\\\((?P<d>(?:[^\\\n]|\\(?![()]))+?)\\\)"
    r"|(?<![\\\w])(?P<e>-?\\[dtc]?frac\{-?\d+(?:[.,]\d+)?\}\{-?\d+(?:[.,]\d+)?\})")  # a bare \frac{1}{2}
_MATH_JOIN_RE = re.compile(r"\s*(?:,?\s*\band\b|,?\s*\bor\b|,)\s*")  # between the parts of one answer
_AND_OR_RE = re.compile(r"\s*,?\s+\b(?:and|or)\b\s+")
_BOX_SEPARATOR_RE = re.compile(r"\b(?:and|or)\b|[,;]")
_PERCENT_AFTER_RE = re.compile(rf"^\$?{_PERCENT}")
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}[,;:]?\s+[A-Za-z]{2,}\b")
_SENTENCE_END_RE = re.compile(r"(?<=[^\d\s])\.\s|\.\s+(?=[A-Z])")
_LATEX_COMMAND_RE = re.compile(r"\\(?:text\w*|mathrm|mbox|operatorname)\s*\{[^{}]*\}|\\[A-Za-z]+")
MAX_PARTS = 6  # at most this many $...$ chained into one answer (Math-Verify: 6)

SOURCES = ("boxed", "hash", "answer", "last_math", "last_number")
FORMATS = {  # answer_format option -> the extraction sources that count as "in the format"
    "any": ("boxed", "hash", "answer"),
    "boxed": ("boxed",),
    "hash": ("hash",),
    "answer": ("answer",),
}


class Extracted(NamedTuple):
    answer: Optional[str]   # the final answer's text, cleaned; None if nothing was found
    source: Optional[str]   # which rule found it: boxed, hash, answer, last_math, last_number


class _Span(NamedTuple):
    start: int
    end: int
    text: str


def plain_number(s: str) -> str:
    """A number written in plain text, in the form the LaTeX parser reads as that number.

    `1 000` (thousands spaced; LaTeX would read 1*000) -> `1000`; `28 percent` -> `28%`. A decimal
    comma (`2,74`, not groups of three) is left as it is: `comma_readings` reads it both ways.

        >>> plain_number("1 000 000"), plain_number("28 percent"), plain_number("1,000"), plain_number("x")
        ('1000000', '28%', '1,000', 'x')
    """
    s = s.strip()
    if not _NUMBER_RE.fullmatch(s):
        return s
    s = re.sub(_PERCENT + "$", "%", s)
    return _SPACED_THOUSANDS_RE.sub(lambda m: re.sub(r"\D", "", m.group(0)), s)


def comma_readings(answer: str) -> list[str]:
    """`2,74` is a decimal comma or the list {2, 74}: both readings; any other answer: itself.

        >>> comma_readings("2,74"), comma_readings("1,000"), comma_readings("1, 2")
        (['2,74', '2.74'], ['1,000'], ['1, 2'])
    """
    s = answer.strip()
    if _DECIMAL_COMMA_RE.fullmatch(s) and not _THOUSANDS_RE.fullmatch(s.rstrip("%")):
        return [answer, s.replace(",", ".")]
    return [answer]


def _boxes(text: str) -> list[_Span]:
    """Each closed `\\boxed{...}` / `\\fbox{...}` (braces may nest) and `\\boxed 5`, outermost only."""
    spans: list[_Span] = []
    closing: dict[int, int] = {}  # "{" -> its "}", in one pass (an unclosed box must not cost a scan each)
    opened: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            opened.append(i)
        elif ch == "}" and opened:
            closing[opened.pop()] = i
    for m in _BOXED_RE.finditer(text):
        if spans and m.start() < spans[-1].end:
            continue  # inside the previous box
        i = m.end()
        if i < len(text) and text[i] == "{":
            if i in closing:  # else unclosed: not an answer
                spans.append(_Span(m.start(), closing[i] + 1, text[i + 1:closing[i]]))
            continue
        token = re.match(r"[^\s$]+", text[i:])
        if token:
            spans.append(_Span(m.start(), i + token.end(), token.group(0)))
    return spans


def _box_group(text: str) -> Optional[_Span]:
    """The last box, with the boxes just before it that belong to the same answer.

    An earlier box joins when the text between the two is under 10 characters, or under 70 with
    `and`, `or`, `,` or `;` in it and a different content (Math-Verify's rule); repeats are dropped.
    """
    boxes = [b for b in _boxes(text) if b.text.strip()]
    if not boxes:
        return None
    parts, first = [boxes[-1].text.strip()], boxes[-1]
    for prev in reversed(boxes[:-1]):
        gap, content = text[prev.end:first.start], prev.text.strip()
        if not (len(gap) < 10 or (content != parts[0] and len(gap) < 70 and _BOX_SEPARATOR_RE.search(gap))):
            break
        if content != parts[0]:
            parts.insert(0, content)
        first = prev
    answer = ", ".join(_clean(p) for p in parts)
    if _PERCENT_AFTER_RE.match(text[boxes[-1].end:]) and not answer.endswith("%"):
        answer += "%"  # \boxed{28} percent
    return _Span(first.start, boxes[-1].end, answer)


def _math_spans(text: str) -> list[_Span]:
    return [_Span(m.start(), m.end(), next(g for g in m.groups() if g is not None)) for m in _MATH_RE.finditer(text)]


def _math_group(text: str, spans: list[_Span], last: int) -> _Span:
    """spans[last] and the math just before it joined by `,` / `and` / `or`: `$-2$ and $1$` -> `-2, 1`."""
    first = last
    while (first > 0 and last - first + 1 < MAX_PARTS
           and _MATH_JOIN_RE.fullmatch(text[spans[first - 1].end:spans[first].start])):
        first -= 1
    answer = ", ".join(_clean(s.text) for s in spans[first:last + 1])
    if _PERCENT_AFTER_RE.match(text[spans[last].end:]) and not answer.endswith("%"):
        answer += "%"  # $28$ percent
    return _Span(spans[first].start, spans[last].end, answer)


def _last_math_or_number(text: str) -> tuple[Optional[str], Optional[str]]:
    """The fallback: the last LaTeX math (joined as above) or the last number, whichever ends later."""
    spans = _math_spans(text)
    number = None
    for number in _NUMBER_RE.finditer(text):
        pass
    if spans and (number is None or number.end() <= spans[-1].end):
        return _math_group(text, spans, len(spans) - 1).text or None, "last_math"
    if number is not None:
        return plain_number(number.group(0)), "last_number"
    return None, None


def _is_prose(s: str) -> bool:
    """Two words in a row outside LaTeX (`Jane planted 3 trees`), not `x = 3 or x = -3` or `12 cm`."""
    return bool(_PROSE_RE.search(_LATEX_COMMAND_RE.sub(" ", _MATH_RE.sub(" $ ", s))))


def _has_math(s: str) -> bool:
    """A digit, a LaTeX command, a relation or a single symbol: `5`, `\\pi`, `x < 3`, `x`; not `correct`."""
    return bool(re.search(r"[\d\\^=<>]", s) or re.fullmatch(r"[-+]?[A-Za-z]", s))


def _clean(answer: str) -> str:
    """An answer's text without markup: bold, quotes, math delimiters, a final full stop, units after a number."""
    s = answer.strip()
    s = re.sub(r"^\*\*|\*\*$", "", s).strip()                      # markdown bold
    s = _SENTENCE_END_RE.split(s)[0].strip().rstrip(".").strip()   # cut at the end of the sentence
    s = re.sub(r'^\\?"(.*?)\\?"$', r"\1", s).strip()              # "quoted"
    for _ in range(2):  # \( ... \), \[ ... \], $ ... $, $$ ... $$ around the whole answer
        spans = _math_spans(s)
        if len(spans) == 1 and spans[0].start == 0 and spans[0].end == len(s):
            s = spans[0].text.strip().rstrip(".,").strip()
    if s.startswith("$") and s.count("$") >= 2 and s.index("$", 1) > 1:
        s = s[1:s.index("$", 1)]  # "$5$ apples" -> its math
    s = s.strip("*").strip()
    m = _LEADING_NUMBER_RE.match(s)
    if m:  # "12 cm", "$5", "72 apples" -> the number
        s = m.group(1).strip()
    return plain_number(s)


def _marker_answer(rest: str) -> str:
    """The answer after `Answer:` / `The answer is` / `####`: the rest of its line (or the next line)."""
    lines = rest.split("\n")
    line = lines[0] if lines[0].strip() or len(lines) == 1 else next((x for x in lines[1:] if x.strip()), "")
    line = re.sub(r'^(?:\*\*|\\?")+', "", line.strip())  # **bold**, "quoted"
    sentence = _SENTENCE_END_RE.split(line)[0]
    spans = _math_spans(sentence)
    if spans and spans[0].start == 0:  # "$12$ and $13$." -> "12, 13"; "\((-6, 10)\). I hope" -> "(-6, 10)"
        last = 0
        while (last + 1 < min(len(spans), MAX_PARTS)
               and _MATH_JOIN_RE.fullmatch(sentence[spans[last].end:spans[last + 1].start])):
            last += 1
        group = _math_group(sentence, spans, last)
        if not _is_prose(sentence[group.end:]):  # "$5$ apples", not "$n$ is the largest, 34"
            return group.text
    elif not _is_prose(sentence):
        cleaned = _clean(line)
        listed = _AND_OR_RE.sub(", ", cleaned)
        return listed if _has_math(listed) else cleaned  # "x = 3 or x = -3" -> "x = 3, x = -3"
    found, _ = _last_math_or_number(sentence)  # a sentence: "Jane started growing Sphere 3 hours ago" -> 3
    return found or _clean(line)


def extract_answer(text: str, strict: bool = False) -> Extracted:
    """The final answer of a completion and the rule that found it (see the module docstring)."""
    box = _box_group(text)
    found = None  # the last marker in the text, of either kind: (source, start, end)
    for source, pattern in (("hash", _HASH_RE), ("answer", _ANSWER_RE)):
        matches = list(pattern.finditer(text))
        if matches and (found is None or matches[-1].start() > found[1]):
            found = (source, matches[-1].start(), matches[-1].end())
    if found is not None:
        answer = _marker_answer(text[found[2]:])
        # a marker after the last box wins, unless what follows it is only words ("is correct")
        if answer and (box is None or (found[1] >= box.end and _has_math(answer))):
            return Extracted(answer, found[0])
    if box is not None and box.text:
        return Extracted(box.text, "boxed")
    if not strict:
        answer, source = _last_math_or_number(text)
        if answer:
            return Extracted(answer, source)
    return Extracted(None, None)


def answer_format(prompts: list[str], completions: list[str], pattern: str = r"Answer:\s*\S+\s*$",
                  **columns: list) -> list[float]:
    """1.0 if the completion ends with the answer format (default `Answer: <x>` on the last line), else 0.0.

        >>> answer_format(["What is 2 + 2?"] * 2, ["2 + 2 = 4. Answer: 4", "It is 4."])
        [1.0, 0.0]
    """
    regex = re.compile(pattern)
    return [1.0 if regex.search(c.strip()) else 0.0 for c in completions]


# ----------------------------------------------------------------------------- equivalence (in workers)

_POWER_CHAIN_RE = re.compile(r"[\w.]+(?:\s*\^\s*[\w.]+)+")


def _nest_power(chain: re.Match) -> str:
    """'9^9^9' -> '9^{9^{9}}': exponents are right-associative, and LaTeX reads 2^10 as 2^1 0."""
    parts = [p.strip() for p in chain.group(0).split("^")]
    nested = parts[-1]
    for base in reversed(parts[:-1]):
        nested = f"{base}^{{{nested}}}"
    return nested


def _as_latex(answer: str) -> str:
    answer = _POWER_CHAIN_RE.sub(_nest_power, answer.strip().replace("**", "^"))
    if ("$" in answer and answer.count("$") % 2 == 0) or "\\boxed" in answer:
        return answer
    return "$" + answer.replace("\n", " ") + "$"  # inline math is one line for Math-Verify


@functools.lru_cache(maxsize=4096)
def _parse(answer: str) -> list:
    from math_verify import parse

    return parse(_as_latex(answer), parsing_timeout=None)  # None: no SIGALRM; the pool's deadline applies


def check_equivalent(gold: str, pred: str, strict: bool = True, float_rounding: int = 6) -> bool:
    """Whether `pred` is mathematically equal to `gold` (Math-Verify). Runs inside a worker.

    strict: Math-Verify's strict mode (variable names matter; a set is not a tuple).
    A `2,74` on either side is read both ways (`comma_readings`): any reading of one equal to any
    reading of the other counts. Raises ValueError when the reference itself does not parse.
    """
    from math_verify import verify

    gold_parsed = [x for reading in comma_readings(gold) for x in _parse(reading)]
    if not gold_parsed:
        raise ValueError(f"reference answer {gold[:80]!r} does not parse")
    pred_parsed = [x for reading in comma_readings(pred) for x in _parse(reading)]
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, float_rounding=float_rounding, strict=strict, timeout_seconds=None))


def warmup_worker() -> None:
    """Run by each worker before it takes tasks: imports sympy and the LaTeX parser (about 1 s)."""
    # Math-Verify warns on every call that timeouts are disabled (we do them with processes)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    check_equivalent(r"\frac{1}{2}", "0.5")
    _parse.cache_clear()


# ----------------------------------------------------------------------------- the reward

class MathReward:
    """`rewards.get("math", **options)`: exact-answer reward with a killable Math-Verify check.

    Columns: `answer` (the reference answer, any form Math-Verify parses; name set by `answer_column`).

        >>> r = MathReward(workers=1)
        >>> r(["What is 27 + 45?"] * 3, ["27 + 45 = 72. Answer: 72", "Answer: 62", "no idea"],
        ...   answer=["72"] * 3)
        [1.0, 0.0, 0.0]
        >>> r.last_metrics["accuracy"]
        0.3333333333333333
        >>> r.close()

    Sub-metrics (`last_metrics`): accuracy (over checked samples), formatted (share in the required
    format), no_answer (share with nothing extracted), timeouts / errors (samples skipped),
    missing_reference, check_seconds (wall time of the batch's checks).
    """

    def __init__(
        self,
        answer_column: str = "answer",
        answer_format: Literal["any", "boxed", "hash", "answer"] = "any",
        strict: bool = False,
        format_bonus: float = 0.0,
        format_penalty: float = 0.0,
        verify_strict: bool = True,
        float_rounding: int = 6,
        check_timeout_s: float = 2.0,
        workers: int | None = None,
        memory_mb: int = 1024,
        max_answer_chars: int = 1000,
    ):
        """
        answer_column: dataset column holding the reference answer.
        answer_format: the required format: any (boxed, ####, or Answer:/The answer is), or one of them.
        strict: score only answers given in the required format; otherwise fall back to the last number.
        format_bonus / format_penalty: added when the format is used / subtracted when it is not.
        verify_strict: Math-Verify strict mode (variable names matter, sets are not tuples).
        float_rounding: decimals Math-Verify rounds to before comparing numbers.
        check_timeout_s: hard deadline of one check; the worker is killed and replaced after it.
        workers: worker processes (default: min(4, CPU cores per local rank)).
        memory_mb: address-space limit of each worker.
        max_answer_chars: longer extracted answers are scored 0 without a check.
        """
        if answer_format not in FORMATS:
            raise ValueError(f"answer_format must be one of {', '.join(FORMATS)}, got {answer_format!r}")
        if check_timeout_s <= 0:
            raise ValueError(f"check_timeout_s must be positive, got {check_timeout_s}")
        self.answer_column, self.answer_format, self.strict = answer_column, answer_format, strict
        self.format_bonus, self.format_penalty = float(format_bonus), float(format_penalty)
        self.verify_strict, self.float_rounding = verify_strict, float_rounding
        self.check_timeout_s, self.max_answer_chars = check_timeout_s, max_answer_chars
        self.pool = WorkerPool("rewards.math:check_equivalent", workers=workers or default_workers(), memory_mb=memory_mb)
        self.last_metrics: dict[str, float] = {}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence) -> list[float | None]:
        if self.answer_column not in columns:
            raise KeyError(f"the math reward needs a '{self.answer_column}' column with reference answers; "
                           f"got columns {sorted(columns)}")
        golds = columns[self.answer_column]
        allowed = FORMATS[self.answer_format]
        scores: list[float | None] = [None] * len(completions)
        correct: list[Optional[bool]] = [None] * len(completions)
        formatted = [False] * len(completions)
        tasks, task_rows = [], []
        no_answer = missing = 0
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            ext = extract_answer(completion, strict=False)
            formatted[i] = ext.source in allowed
            if gold is None or not str(gold).strip():
                missing += 1
                continue
            answer = ext.answer if (formatted[i] or not self.strict) else None
            if answer is None:
                no_answer += 1
                correct[i] = False
            elif answer.strip() == str(gold).strip():
                correct[i] = True  # identical text needs no sympy
            elif len(answer) > self.max_answer_chars:
                correct[i] = False
            else:
                tasks.append({"gold": str(gold), "pred": answer, "strict": self.verify_strict,
                              "float_rounding": self.float_rounding})
                task_rows.append(i)
        t0 = time.monotonic()
        outcomes = self.pool.run(tasks, timeout_s=self.check_timeout_s, deadline_s=_budget()) if tasks else []
        check_seconds = time.monotonic() - t0
        timeouts = errors = 0
        for i, out in zip(task_rows, outcomes):
            if out.status == "ok":
                correct[i] = bool(out.value)
            elif out.status == "timeout":
                timeouts += 1
            else:
                errors += 1
        for i, ok in enumerate(correct):
            if ok is not None:
                fmt = self.format_bonus if formatted[i] else -self.format_penalty
                scores[i] = (1.0 if ok else 0.0) + fmt
        checked = [ok for ok in correct if ok is not None]
        n = max(len(completions), 1)
        self.last_metrics = {
            "accuracy": sum(checked) / len(checked) if checked else float("nan"),
            "formatted": sum(formatted) / n,
            "no_answer": no_answer / n,
            "timeouts": float(timeouts),
            "errors": float(errors),
            "missing_reference": float(missing),
            "check_seconds": check_seconds,
        }
        return scores

    def close(self) -> None:
        """Kill the worker processes (also done at garbage collection and exit)."""
        self.pool.close()


def default_workers() -> int:
    """min(4, this rank's share of the CPU cores): torchrun ranks on one machine split the cores."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(4, (os.cpu_count() or 1) // max(local_ranks, 1)))


def _budget() -> float | None:
    """What is left of the enclosing reward deadline, minus a margin to return in time."""
    left = time_left()
    return None if left is None else max(0.0, left - 0.2)
