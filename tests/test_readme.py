"""The README is the manual: every command the parser has is in it.

The rules, checked against ``build_parser()`` (so a new command, action or
option fails here until the README has it):

* every command has a section: a ``###`` heading naming it in backticks as
  ``vmshare NAME`` (one heading may name several, as enable/disable);
* every command and every action (``ksm unmerge``, ``hook status``) has an
  example in a fenced block of its section: a line ``$ vmshare ...`` or
  ``# vmshare ...`` whose words after the global options are its name;
* every option of a command or its actions appears in that section, by its
  long flag (its short one if it has none); the global options appear in the
  "Commands" introduction, before the first command's section;
* every path into this repository written in backticks or as a link exists;
* the two commands at the very top stay as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmshare.cli.parsertree import Command, Option, ParserTree, vmshare_tree

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TREE = vmshare_tree()
TOP = "\n".join((
    "```sh",
    "bash integration/demo.sh     # boots 3 small guests, merges them with kernel KSM, "
    "shows each VM's exact savings",
    "bash integration/test.sh     # the whole test suite: ruff, mypy, unit tests and "
    "real-hypervisor tests",
    "```"))
REPO_DIRS = ("vmshare", "tests", "integration", "benchmarks", "hooks", "contrib", "docs")


@dataclass(frozen=True)
class Section:
    heading: str
    text: str               # heading included
    examples: tuple[str, ...]    # fenced lines starting with "$ vmshare" or "# vmshare"


def sections(markdown: str) -> list[Section]:
    """Each ``##``/``###`` section, with the example command lines of its fenced blocks."""
    found: list[Section] = []
    heading, fenced = "", False
    lines: list[str] = []
    examples: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{2,3} ", line):
            found.append(Section(heading, "\n".join(lines), tuple(examples)))
            heading, lines, examples = line, [], []
        elif fenced and re.match(r"[$#] vmshare\b", line):
            examples.append(line[2:])
        lines.append(line)
    found.append(Section(heading, "\n".join(lines), tuple(examples)))
    return found


SECTIONS = sections(README)


def sections_of(command: str) -> list[Section]:
    """The sections whose ``###`` heading names ``vmshare COMMAND`` in backticks."""
    pattern = re.compile(rf"`vmshare {re.escape(command)}(?=[ `|])")
    return [s for s in SECTIONS if s.heading.startswith("### ") and pattern.search(s.heading)]


def command_words(example: str, tree: ParserTree) -> list[str]:
    """The words of ``vmshare ...`` after the global options (and their values)."""
    valued = {f for o in tree.options if o.metavar is not None for f in o.flags}
    words = example.split()[1:]
    while words and words[0].startswith("-"):
        words = words[2:] if words[0] in valued else words[1:]
    return words


def flag_of(opt: Option) -> str:
    return next((f for f in opt.flags if f.startswith("--")), opt.flags[0])


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


@pytest.mark.parametrize("command", TREE.commands, ids=lambda c: c.name)
def test_every_command_has_a_section(command: Command) -> None:
    assert sections_of(command.name), f"no ### heading names `vmshare {command.name}`"


@pytest.mark.parametrize("command", [c for c in TREE.walk() if not c.actions],
                         ids=lambda c: c.name)
def test_every_command_and_action_has_an_example(command: Command) -> None:
    examples = [e for s in sections_of(command.path[0]) for e in s.examples]
    assert any(command_words(e, TREE)[:len(command.path)] == list(command.path)
               for e in examples), f"no example `$ vmshare {command.name} ...` in its section"


@pytest.mark.parametrize("command", TREE.commands, ids=lambda c: c.name)
def test_every_option_is_in_its_command_section(command: Command) -> None:
    text = "\n".join(s.text for s in sections_of(command.name))
    missing = sorted({flag_of(o) for c in command.walk() for o in c.options
                      if not mentions(text, flag_of(o))})
    assert not missing, f"the section of `vmshare {command.name}` never mentions {missing}"


def test_global_options_are_in_the_commands_introduction() -> None:
    intro = next(s.text for s in SECTIONS if s.heading == "## Commands")
    for opt in TREE.options:
        for flag in opt.flags:
            assert mentions(intro, flag), flag


def test_paths_into_the_repository_exist() -> None:
    dirs = "|".join(REPO_DIRS)
    quoted = re.findall(rf"`((?:{dirs})/[^`\s]*)`", README)
    linked = re.findall(rf"\]\(((?:{dirs})/[^)\s]*)\)", README)
    paths = set(quoted) | set(linked)
    assert len(paths) > 15
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"the README names paths that do not exist: {missing}"


def test_the_two_commands_stay_at_the_top() -> None:
    first_block = README[README.index("```"):]
    assert first_block.startswith(TOP)


def test_the_rules_can_fail() -> None:
    """A README without the remerge section, or its example, fails the checks."""
    remerge = next(c for c in TREE.commands if c.name == "remerge")
    cut = re.sub(r"^### `vmshare remerge.*?(?=^### )", "", README, flags=re.M | re.S)
    assert not [s for s in sections(cut) if "`vmshare remerge" in s.heading]
    no_example = README.replace("$ vmshare remerge", "$ vmshare status")
    examples = [e for s in sections(no_example) if "`vmshare remerge" in s.heading
                for e in s.examples]
    assert not any(command_words(e, TREE)[:1] == list(remerge.path) for e in examples)
    assert command_words("vmshare -c qemu:///system --debug ksm unmerge --force",
                         TREE)[:2] == ["ksm", "unmerge"]
