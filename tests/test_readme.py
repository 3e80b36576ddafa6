"""The README's first screen stays true: CI runs exactly its install and test commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_bash_block() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    commands = _first_bash_block()
    install = [c for c in commands if c.startswith("pip install")]
    tests = [c for c in commands if c.startswith("python -m pytest")]
    assert len(install) == 1 and len(tests) == 1
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install[0] in ci_lines
    assert tests[0] in ci_lines


def test_quickstart_command_exists() -> None:
    quickstart = [c for c in _first_bash_block() if c.startswith("bash ")]
    assert len(quickstart) == 1
    assert (ROOT / quickstart[0].split()[1]).is_file()
