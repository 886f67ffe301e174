"""A non-editable install ships what the code reads at run time: a wheel holds every module of the
packages, every recipes/*.yaml (as posttrain/recipes/) and the bundled data files, and the unpacked
wheel, imported from outside the checkout, finds its recipes and data and dry-runs train.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("posttrain", "rewards", "data")  # pyproject.toml [tool.setuptools] packages (and subpackages)


def _shipped(path: Path) -> bool:
    """A file of a package the wheel must hold: code and data, not caches or the folder's README."""
    return "__pycache__" not in path.parts and path.suffix not in (".pyc", ".md") and path.is_file()


def expected_files() -> set[str]:
    """Wheel paths, from the repository as it is: every file of the packages, and each recipe."""
    files = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*") if _shipped(p)}
    files |= {f"posttrain/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    return files


def build_wheel(tmp_path: Path) -> Path:
    # Built from a copy, so the checkout gets no build/ or egg-info of this test's making.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in (*PACKAGES, "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("posttrain-*.whl")
    return wheel


def test_wheel_ships_recipes_and_data(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = expected_files()
    assert "data/safety_prompts.jsonl" in expected and any(f.startswith("posttrain/recipes/") for f in expected)
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}; fix pyproject.toml"

    # The unpacked wheel stands in for site-packages; run from elsewhere, it is what gets imported.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    recipes = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    check = f"""
import sys, runpy
import posttrain, data, rewards
from posttrain.config import RECIPES_DIR
from posttrain.recipe import available_recipes
from data.safety import SAFETY_PROMPTS
site = {str(site)!r}
for module in (posttrain, data, rewards):
    assert module.__file__.startswith(site), module.__file__
assert str(RECIPES_DIR) == site + "/posttrain/recipes", RECIPES_DIR
assert available_recipes() == {recipes!r}, available_recipes()
assert str(SAFETY_PROMPTS).startswith(site) and all(len(data.load(name)) for name in data.NAMES)
sys.argv = ["train.py", "recipe=demo", "dry_run=true", "run_dir={tmp_path / 'runs'}"]
runpy.run_path({str(ROOT / 'train.py')!r}, run_name="__main__")
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("# resolved config: demo\n") and "plan for 'demo'" in proc.stdout
