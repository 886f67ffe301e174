"""No import cycle in posttrain/ or rewards/: every import between the package's own modules, at the
top of a file or inside a function (a lazy import hides a cycle, it does not remove it), forms a graph
without cycles, so each module can be read, tested and changed on its own terms."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_names(package: str) -> dict[str, Path]:
    """dotted name inside `package` -> file, subpackages included ("stages.policy"; "" is the package itself)."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = list(path.relative_to(ROOT / package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (relative or absolute, anywhere in the file)."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if name else []
        if path.name != "__init__.py":
            here = here[:-1]  # the package a module's relative imports start from
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                elif (node.module or "").split(".")[0] == package:
                    base = node.module.split(".")[1:]
                else:
                    continue
                for alias in node.names:  # `from .x import y`: y may be a module of its own
                    sub = ".".join([*base, alias.name])
                    deps.add(sub if sub in modules else ".".join(base))
            elif isinstance(node, ast.Import):
                deps.update(".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith(f"{package}."))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("package", ["posttrain", "rewards"])
def test_no_import_cycle(package):
    graph = imports_of(package)
    assert len(graph) > 5 and any(graph.values())  # the walk found the package and its imports
    cycle = find_cycle(graph)
    assert cycle is None, f"{package}: import cycle {' -> '.join(cycle)}"


def test_the_walk_reaches_the_stages_subpackage():
    graph = imports_of("posttrain")
    assert {"rl", "loop"} <= {d.removeprefix("stages.") for d in graph["stages.policy_warp"]}
    assert "engine" in graph["stages.rl"] and "stages.policy_warp" in graph["stages.policy"]


def test_library_code_never_exits():
    """A preemption or an error is an exception that train.py turns into a status: no SystemExit in the
    library, and sys.exit only in a module's `if __name__ == "__main__":` entry point."""
    for package in ("posttrain",):
        for name, path in module_names(package).items():
            tree = ast.parse(path.read_text(), str(path))
            allowed = {id(n) for top in tree.body if isinstance(top, ast.If) and "__main__" in ast.dump(top.test)
                       for n in ast.walk(top)}
            for node in ast.walk(tree):
                raised = isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.dump(node.exc)
                exits = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                         and node.func.attr == "exit" and ast.dump(node.func.value) == ast.dump(ast.Name("sys")))
                assert not raised, f"{path}:{node.lineno} raises SystemExit"
                assert not exits or id(node) in allowed, f"{path}:{node.lineno} calls sys.exit outside __main__"


def test_no_citation_of_documents_outside_the_repository():
    names = ["DESIGN" + ".md", "VISION_QAT" + "_LONGCTX", "STYLE" + ".md", "../" + "shared"]
    skip = {".git", "runs", ".venv", "build", "dist"}
    for path in ROOT.rglob("*"):
        if path.suffix in {".py", ".md", ".yaml", ".toml", ".txt"} and not skip & set(path.relative_to(ROOT).parts):
            text = path.read_text(errors="replace")
            for n in names:
                assert n not in text, f"{path.relative_to(ROOT)} cites {n}, which is not in this repository"


def test_the_walk_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
