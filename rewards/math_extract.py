"""Final-answer extraction for the math reward: regular expressions over a completion, no sympy
(it runs in the trainer's process; rewards/math.py checks the answer with Math-Verify in workers).

    >>> extract_answer("so 27 + 45 = 72. Answer: 72")
    Extracted(answer='72', source='answer')
    >>> extract_answer(r"The area is $\\boxed{\\frac{\\sqrt{3}}{4}}$.")
    Extracted(answer='\\\\frac{\\\\sqrt{3}}{4}', source='boxed')
    >>> extract_answer(r"The solutions are $\\boxed{(1, 2)}$ and $\\boxed{(2, 1)}$.")
    Extracted(answer='(1, 2), (2, 1)', source='boxed')

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
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

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
