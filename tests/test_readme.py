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


def _layout_entries() -> dict[str, str]:
    """The README's layout block: each path it names (``spiral_lit/tasks/``, ``docs/algorithm.md``) -> its text.

    An entry starts at column 0 (a repository path) or column 2 (a path inside ``spiral_lit/``); deeper lines
    continue the entry above. ``a.py, b.py   text`` names two paths with one text.
    """
    section = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "README.md's Layout section has no code block"
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in block.group(1).splitlines()[1:]:  # the first line is ``spiral_lit/``
        indent = len(line) - len(line.lstrip())
        if indent > 2:
            for name in names:
                entries[name] += " " + line.strip()
            continue
        head, _, text = line.strip().partition("  ")
        names = [("spiral_lit/" if indent == 2 else "") + name.strip() for name in head.split(",")]
        entries.update(dict.fromkeys(names, text.strip()))
    return entries


def test_layout_section_matches_the_tree() -> None:
    """Every module and subpackage of ``spiral_lit`` has its line, and every path named there exists."""
    entries = _layout_entries()
    missing = [str(p) for p in entries if not (ROOT / p).exists()]
    assert not missing, f"README layout names paths that do not exist: {missing}"
    package = ROOT / "spiral_lit"
    tree = [f"spiral_lit/{p.name}" for p in package.glob("*.py") if p.name != "__init__.py"]
    tree += [f"spiral_lit/{p.parent.name}/" for p in package.glob("*/__init__.py")]
    unnamed = sorted(set(tree) - set(entries))
    assert not unnamed, f"README layout has no line for: {unnamed}"


def test_layout_section_names_every_module_of_a_subpackage() -> None:
    entries = _layout_entries()
    unnamed = []
    for init in sorted((ROOT / "spiral_lit").glob("*/__init__.py")):
        words = set(re.findall(r"\w+", entries.get(f"spiral_lit/{init.parent.name}/", "")))
        unnamed += [str(p.relative_to(ROOT)) for p in sorted(init.parent.glob("*.py")) if p.stem not in words]
    unnamed = [p for p in unnamed if not p.endswith("__init__.py")]
    assert not unnamed, f"README layout does not name these modules in their subpackage's line: {unnamed}"
