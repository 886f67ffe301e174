"""Build tests/data/math_verify_cases.json: Math-Verify's own answer-level test cases, as data.

    python tests/data/make_math_verify_cases.py GIT_DIR [--sdist math_verify-X.Y.Z.tar.gz] [-o OUT]

GIT_DIR: a clone (bare is fine) of https://github.com/huggingface/Math-Verify; the cases come
from its HEAD's tests/. --sdist: optionally the PyPI source archive of the installed release
(`pip download math-verify==0.9.0 --no-deps --no-binary :all:`), whose tests/ may hold rows the
git snapshot lacks; only rows not already taken from git are added, each marked with its source.

What is taken: every row of a `@pytest.mark.parametrize` whose test asserts
`compare_strings(gold, pred, ...) == expected` (the helper in upstream tests/test_all.py:
parse both sides with [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
restricted to `match_types`, then verify with `precision`, `strict`, `allow_set_relation_comp`)
or `int(verify(parse(gold), parse(pred))) == result` (default configs), plus such asserts with
literal arguments in unparametrized tests. The per-case keyword arguments of the call are kept
as `options`. Rows are read with the ast module, never imported or run; the one computed row
(`f"{math.sqrt(17):.15f}"`) and f-strings are evaluated with only `math` in scope. Commented-out rows are not
rows. Everything else is listed in `excluded` with the reason: tests of parse internals or
string extraction (not a gold/prediction verdict), mocked timeouts and errors, sympy-level
asserts, and rows needing an option the math reward does not expose.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = "huggingface/Math-Verify"
HELPERS = {"compare_strings"}
# the reward's options that a case's options map onto; any other non-default option excludes the row
NOT_EXPOSED = {"allow_set_relation_comp": False}
WHOLE_FILES_EXCLUDED = {  # file -> why none of its tests is a gold/prediction verdict
    "tests/test_configs.py": "parse() internals: boxed_match_priority and NormalizationConfig switches, "
                             "asserts on the parsed sympy object, no gold/prediction verdict",
    "tests/test_string_extraction.py": "StringExtractionConfig (multiple-choice letters): asserts parse()'s "
                                       "output list, no verdict; the math reward does not extract letters",
    "tests/test_timeout.py": "mocks parse_expr/latex2sympy/sympy_expr_eq to sleep; tests SIGALRM timeouts",
    "tests/test_raise_on_error.py": "mocks sympy_expr_eq to raise; tests error propagation",
    "tests/test_gamma_func.py": "parse() of \\Gamma to sympy.gamma / EulerGamma; asserts the sympy object",
    "tests/__init__.py": "empty",
}


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True).stdout


def _value(node: ast.AST):
    """A row element: a literal, or an f-string/expression using only `math` (upstream computes one)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        src = ast.unparse(node)
        if any(isinstance(n, ast.Name) and n.id != "math" for n in ast.walk(node)):
            raise ValueError(f"row element {src!r} is neither a literal nor an expression of math.*")
        return eval(compile(ast.Expression(node), "<row>", "eval"), {"__builtins__": {}, "math": math})


def _call_of(test: ast.FunctionDef):
    """(helper, positional arg nodes, keyword nodes, expected node) of `assert <call> == <expected>`."""
    for node in ast.walk(test):
        if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.ops[0], ast.Eq)):
            continue
        left, right = node.test.left, node.test.comparators[0]
        if isinstance(left, ast.Call) and isinstance(left.func, ast.Name) and left.func.id == "int" and left.args:
            left = left.args[0]  # int(verify(...)) == result
        if not isinstance(left, ast.Call):
            continue
        name = left.func.id if isinstance(left.func, ast.Name) else None
        if name in HELPERS:
            yield "compare_strings", left.args, {k.arg: k.value for k in left.keywords}, right, node.lineno
        elif name == "verify" and all(isinstance(a, ast.Call) and getattr(a.func, "id", "") == "parse"
                                      and len(a.args) == 1 and not a.keywords for a in left.args[:2]):
            yield "verify_parse", [a.args[0] for a in left.args[:2]], {k.arg: k.value for k in left.keywords}, \
                right, node.lineno


def _parametrize(test: ast.FunctionDef):
    for dec in test.decorator_list:
        if isinstance(dec, ast.Call) and ast.unparse(dec.func) == "pytest.mark.parametrize":
            names = [n.strip() for n in ast.literal_eval(dec.args[0]).split(",")]
            return names, dec.args[1].elts
    return None, None


def cases_of(path: str, source: str, origin: dict) -> tuple[list[dict], list[dict]]:
    cases, excluded = [], []
    tree = ast.parse(source)
    for test in tree.body:
        if not (isinstance(test, ast.FunctionDef) and test.name.startswith("test_")):
            continue
        names, rows = _parametrize(test)
        calls = list(_call_of(test))
        asserts = sum(isinstance(n, ast.Assert) for n in ast.walk(test))
        if not calls:
            excluded.append({"file": path, "test": test.name, "rows": len(rows) if rows else asserts,
                             "reason": "no compare_strings/verify(parse, parse) verdict assert"})
            continue
        if len(calls) < asserts:
            excluded.append({"file": path, "test": test.name, "rows": asserts - len(calls),
                             "reason": "asserts on sympy objects through grader.sympy_expr_eq "
                                       "(float_rounding/numeric_precision internals), not on text"})
        for helper, args, kwargs, expected_node, line in calls:
            row_nodes = rows if rows is not None else [None]
            for r, row in enumerate(row_nodes):
                values = dict(zip(names, (_value(e) for e in row.elts))) if row is not None else {}

                def resolve(node):
                    return values[node.id] if isinstance(node, ast.Name) and node.id in values else _value(node)

                gold, pred = resolve(args[0]), resolve(args[1])
                options = {k: resolve(v) for k, v in kwargs.items()}
                case = {"id": f"{path}::{test.name}[{r}]", **origin, "file": path, "test": test.name, "row": r,
                        "line": (row.lineno if row is not None else line), "helper": helper,
                        "gold": gold, "pred": pred, "expected": bool(resolve(expected_node)), "options": options}
                blocked = {k: v for k, v in options.items() if k in NOT_EXPOSED and v != NOT_EXPOSED[k]}
                if blocked:
                    excluded.append({"file": path, "test": test.name, "row": r, "rows": 1,
                                     "reason": f"needs {blocked}, a verify() option the math reward does not expose "
                                               f"(it always compares with the default {NOT_EXPOSED})"})
                    continue
                cases.append(case)
    return cases, excluded


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("git_dir")
    ap.add_argument("--sdist", help="PyPI sdist of the installed release, for rows the git snapshot lacks")
    ap.add_argument("-o", "--out", default=str(Path(__file__).with_name("math_verify_cases.json")))
    a = ap.parse_args(argv)

    commit = _git(a.git_dir, "rev-parse", "HEAD").strip()
    version = next(line.split('"')[1] for line in _git(a.git_dir, "show", "HEAD:pyproject.toml").splitlines()
                   if line.startswith("version"))
    files = sorted(p for p in _git(a.git_dir, "ls-tree", "-r", "--name-only", "HEAD", "tests").split()
                   if p.endswith(".py"))
    origin = {"source": f"github.com/{REPO}@{commit}"}
    cases, excluded = [], []
    for path in files:
        if path in WHOLE_FILES_EXCLUDED:
            excluded.append({"file": path, "reason": WHOLE_FILES_EXCLUDED[path]})
            continue
        c, e = cases_of(path, _git(a.git_dir, "show", f"HEAD:{path}"), origin)
        cases += c
        excluded += e
    sources = [{"repo": f"https://github.com/{REPO}", "commit": commit, "version": version,
                "files": [p for p in files if p not in WHOLE_FILES_EXCLUDED]}]

    if a.sdist:
        blob = Path(a.sdist).read_bytes()
        sha = hashlib.sha256(blob).hexdigest()
        seen = {(c["test"], c["gold"], c["pred"], c["expected"], json.dumps(c["options"], sort_keys=True))
                for c in cases}
        added = 0
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                parts = member.name.split("/")
                if len(parts) != 3 or parts[1] != "tests" or not parts[2].endswith(".py"):
                    continue
                path = "/".join(parts[1:])
                if path in WHOLE_FILES_EXCLUDED:
                    if not any(e["file"] == path for e in excluded):
                        excluded.append({"file": path, "source": f"pypi sdist {Path(a.sdist).name}",
                                         "reason": WHOLE_FILES_EXCLUDED[path]})
                    continue
                text = tar.extractfile(member).read().decode()
                c, _ = cases_of(path, text, {"source": f"pypi:{Path(a.sdist).name} sha256:{sha}"})
                for case in c:
                    key = (case["test"], case["gold"], case["pred"], case["expected"],
                           json.dumps(case["options"], sort_keys=True))
                    if key not in seen:
                        case["id"] = f"sdist:{case['id']}"
                        cases.append(case)
                        seen.add(key)
                        added += 1
        sources.append({"pypi_sdist": Path(a.sdist).name, "sha256": sha,
                        "note": f"{added} rows that the git snapshot lacks"})

    out = {
        "about": "Math-Verify's answer-level test cases (gold, prediction, expected verdict), taken as data "
                 "with attribution (Apache 2.0); made by tests/data/make_math_verify_cases.py, read by "
                 "tests/test_math_verify_cases.py. options: the keyword arguments the upstream test passes to "
                 "compare_strings (match_types, precision, strict, allow_set_relation_comp; defaults "
                 "['latex', 'expr'], 6, True, False); helper verify_parse = verify(parse(gold), parse(pred)).",
        "sources": sources,
        # rows that upstream lists more than once (kept: each is a row its test runs)
        "repeated_rows": len(cases) - len({json.dumps([c["test"], c["gold"], c["pred"], c["expected"], c["options"]])
                                           for c in cases}),
        "excluded": excluded,
        "cases": cases,
    }
    Path(a.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases, {sum(e.get('rows', 0) for e in excluded)} rows and "
          f"{sum('rows' not in e for e in excluded)} files excluded -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
