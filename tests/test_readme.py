"""The README's set-up commands are the ones CI runs, and its file tree lists every tracked file."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"## Set up.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    demo, tests = readme_commands()
    assert "python train.py recipe=demo" in demo
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines


def test_file_tree_lists_every_tracked_file():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tree = re.search(r"## Files\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    names = {line.split()[0] for line in tree.splitlines() if line.strip()}
    exempt = {".gitignore", "README.md"}
    missing = [f for f in tracked if f not in exempt and f not in names and Path(f).name not in names]
    assert not missing, f"README file tree lacks: {missing}"
