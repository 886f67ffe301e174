"""The README's set-up commands are the ones CI runs, and its file tree lists every tracked file."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    section = re.search(r"## Set up\n(.*?)\n## ", (ROOT / "README.md").read_text(), re.S).group(1)
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    system, demo, tests = readme_commands()
    assert "python train.py recipe=demo" in demo
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines
    # the system packages the README asks for are the ones CI installs
    packages = system.split("apt-get install -y")[1].split()
    assert any(line.startswith("apt-get") and line.split("install -y -qq")[1].split() == packages for line in ci_lines)


def test_file_tree_lists_every_tracked_file():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tree = re.search(r"## Files\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    names = {line.split()[0] for line in tree.splitlines() if line.strip()}
    exempt = {".gitignore", "README.md"}
    missing = [f for f in tracked if f not in exempt and f not in names and Path(f).name not in names]
    assert not missing, f"README file tree lacks: {missing}"
