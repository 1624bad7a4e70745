"""The README's commands are real, and the Chinese README stays in step with the English one."""

import re
from pathlib import Path

from qctrain.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("qctrain", "make", "docker", "kubectl", "torchrun", "accelerate")


def commands(path: Path) -> list[list[str]]:
    """Program and subcommand of each command line inside the fenced code blocks."""
    found, in_block = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and (words := line.split(" #")[0].split()) and words[0] in PROGRAMS:
            found.append(words[:2])
    return found


def test_chinese_readme_has_the_same_sections_and_commands():
    english, chinese = ROOT / "README.md", ROOT / "README.zh.md"
    count = [len(re.findall(r"^## ", p.read_text(encoding="utf-8"), flags=re.M)) for p in (english, chinese)]
    assert count[0] == count[1]
    assert commands(english) == commands(chinese)


def test_readme_qctrain_commands_exist():
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    used = {cmd[1] for cmd in commands(ROOT / "README.md") if cmd[0] == "qctrain"}
    assert used and used <= subcommands, used - subcommands


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = {cmd[1] for cmd in commands(ROOT / "README.md") if cmd[0] == "make" and len(cmd) > 1}
    assert {"demo", "test"} <= targets
    assert all(re.search(rf"^{t}:", makefile, flags=re.M) for t in targets)
