"""vmshare(1): generated from the parser, rendered by the real man(1), and
checked against the parser it came from, so a new command or option that the
page misses fails here."""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmshare.cli import context, manpage
from vmshare.cli.parsertree import Option, ParserTree, read_parser, vmshare_tree
from vmshare.config import DaemonSettings
from vmshare.tuner.loop import TUNER_LOCK

ROOT = Path(__file__).resolve().parent.parent
MANWIDTH = 100
TOOL_MISSING = "{} is not installed (integration/setup.sh installs man-db, which brings it)"


@pytest.fixture(scope="module")
def tree() -> ParserTree:
    return vmshare_tree()


@pytest.fixture(scope="module")
def page(tree: ParserTree) -> str:
    return manpage.render(tree)


def render_with_man(roff: str, tmp: Path) -> str:
    if shutil.which("man") is None:
        pytest.skip(TOOL_MISSING.format("man"))
    path = tmp / "vmshare.1"
    path.write_text(roff)
    env = {**os.environ, "MANWIDTH": str(MANWIDTH), "MANPAGER": "cat", "PAGER": "cat",
           "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    env.pop("MANOPT", None)
    done = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return re.sub(".\b", "", done.stdout)      # overstrike bold, if man kept it


@pytest.fixture(scope="module")
def rendered(page: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return render_with_man(page, tmp_path_factory.mktemp("man"))


def section(text: str, title: str) -> str:
    """A top-level section (NAME, FILES, ...) of the rendered page."""
    match = re.search(rf"^{re.escape(title)}\n(.*?)(?=^\S)", text, re.M | re.S)
    assert match, f"no {title} section in the rendered page"
    return match.group(1)


def command_sections(text: str, tree: ParserTree) -> dict[str, str]:
    """Each command's subsection of COMMANDS, by its heading ``   vmshare NAME``."""
    commands = section(text, "COMMANDS")
    names = [c.name for c in tree.walk()]
    starts = {}
    for name in names:
        m = re.search(rf"^ {{3}}vmshare {re.escape(name)}$", commands, re.M)
        assert m, f"COMMANDS has no heading for 'vmshare {name}'"
        starts[name] = m.start()
    ordered = sorted(starts.items(), key=lambda kv: kv[1])
    ends = [s for _, s in ordered[1:]] + [len(commands)]
    return {name: commands[start:end] for (name, start), end in zip(ordered, ends, strict=True)}


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_every_command_and_action_has_a_section_with_its_help(rendered: str,
                                                              tree: ParserTree) -> None:
    sections = command_sections(rendered, tree)
    assert len(sections) == len(list(tree.walk())) > 20
    for command in tree.walk():
        body = " ".join(sections[command.name].split())
        assert " ".join(command.help.split()) in body, command.name
        for action in command.actions:
            assert has_word(body, action.path[-1]), (command.name, action.name)


def option_item(text: str, opt: Option) -> bool:
    """Is ``opt`` listed as an item (``-c, --connect URI``, then its help) in ``text``?"""
    tag = ", ".join(opt.flags)
    if opt.metavar is not None:
        tag += f" [{opt.metavar}]" if opt.value_optional else f" {opt.metavar}"
    item = re.search(rf"^ {{7}}{re.escape(tag)}(?: +|\n)(.*?)(?=^ {{0,7}}\S|\Z)", text,
                     re.M | re.S)
    return item is not None and " ".join(opt.help.split()) in " ".join(item.group(1).split())


def test_every_option_of_every_command_is_an_item_of_its_section(rendered: str,
                                                                 tree: ParserTree) -> None:
    sections = command_sections(rendered, tree)
    checked = 0
    for command in tree.walk():
        for opt in command.options:
            assert option_item(sections[command.name], opt), (command.name, opt.flags)
            checked += 1
        for pos in command.positionals:
            assert has_word(sections[command.name], pos.metavar), (command.name, pos.metavar)
    assert checked > 70


def test_global_options_and_the_synopsis(rendered: str, tree: ParserTree) -> None:
    options = section(rendered, "GLOBAL OPTIONS")
    for opt in tree.options:
        assert option_item(options, opt), opt.flags
    synopsis = " ".join(section(rendered, "SYNOPSIS").split())
    for command in tree.walk():
        if not command.actions:
            assert f"vmshare [global options] {command.name}" in synopsis, command.name


def test_files_are_the_codes_own_defaults(rendered: str) -> None:
    files = section(rendered, "FILES")
    d = DaemonSettings()
    for path in (d.audit_log, d.state_file, d.history_file, d.spool_dir, d.socket, TUNER_LOCK,
                 "/etc/vmshare/vmshare.toml", "/etc/libvirt/hooks/qemu.d/vmshare"):
        assert re.search(rf"^ {{7}}{re.escape(str(path))}$", files, re.M), path
    hook = (ROOT / "hooks" / "vmshare-qemu-hook").read_text()
    assert f'DEFAULT_CONF = "{manpage.HOOK_CONF}"' in hook


def test_every_environment_variable_the_code_reads_is_documented(rendered: str) -> None:
    sources = [*(ROOT / "vmshare").rglob("*.py"), ROOT / "hooks" / "vmshare-qemu-hook"]
    names = {n for p in sources for n in re.findall(r"\bVMSHARE_[A-Z_]+\b", p.read_text())}
    assert {"VMSHARE_CONFIG", "VMSHARE_DAEMON_DOMAINS", "VMSHARE_SOCKET"} <= names
    environment = section(rendered, "ENVIRONMENT")
    missing = sorted(n for n in names if not has_word(environment, n))
    assert not missing, f"ENVIRONMENT misses {missing}"


def returned_ints(path: Path, function: str) -> set[int]:
    """Integer literals and EXIT_* names that ``function`` returns."""
    tree = ast.parse(path.read_text())
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    found: set[int] = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, int):
            found.add(node.value.value)
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Name) \
                and node.value.id.startswith("EXIT_"):
            found.add(getattr(context, node.value.id))
    return found


def test_every_exit_status_is_documented(rendered: str) -> None:
    codes = manpage.error_exit_codes() | returned_ints(ROOT / "vmshare/cli/main.py", "main")
    assert {0, 1, 2, 130} <= codes
    assert codes <= set(manpage.EXIT_MEANINGS)
    status = section(rendered, "EXIT STATUS")
    for code in codes:
        assert re.search(rf"^ {{7}}{code} ", status, re.M), code


def test_notes_name_real_commands(tree: ParserTree) -> None:
    names = {c.name for c in tree.walk()}
    assert set(manpage.COMMAND_NOTES) <= names


def test_every_option_and_command_has_help(tree: ParserTree) -> None:
    """The page says what each option does: an option without help= fails here."""
    for command in tree.walk():
        assert command.help, command.name
        for opt in command.options:
            assert opt.help.strip(), (command.name, opt.flags)


@pytest.mark.parametrize(("text", "roff"), [
    ("a\\b", "a\\eb"),
    ("--json", "\\-\\-json"),
    (".dot first", "\\&.dot first"),
    ("'quote first", "\\&'quote first"),
    ("x\n.y", "x\n\\&.y"),
    ("it's fine.", "it's fine."),
])
def test_escape(text: str, roff: str) -> None:
    assert manpage.esc(text) == roff


def test_groff_reports_no_warnings(page: str, tmp_path: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip(TOOL_MISSING.format("groff"))

    def warnings(roff: str) -> str:
        path = tmp_path / "page.1"
        path.write_text(roff)
        done = subprocess.run(["groff", "-ww", "-z", "-man", str(path)], capture_output=True,
                              text=True, timeout=60, check=False)
        return done.stderr

    assert "warning" in warnings(page.replace("vmshare \\- ", "vmshare \\q ", 1))  # it can see
    assert warnings(page) == ""


def test_a_new_option_is_on_the_page_without_touching_the_generator(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="vmshare", description="toy")
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("frob", help="frobnicate a domain")
    s.add_argument("domain", metavar="DOMAIN", help="which")
    s.add_argument("--brand-new-option", type=int, default=7, metavar="N",
                   help="new (default %(default)s)")
    s.add_argument("--hidden", help=argparse.SUPPRESS)
    text = render_with_man(manpage.render(read_parser(parser)), tmp_path)
    frob = command_sections(text, read_parser(parser))["frob"]
    assert option_item(frob, read_parser(parser).commands[0].options[0])
    assert "new (default 7)" in frob
    assert "--hidden" not in text


def test_the_module_writes_the_page(tmp_path: Path, page: str) -> None:
    out = tmp_path / "vmshare.1"
    done = subprocess.run([sys.executable, "-m", "vmshare.cli.manpage", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == page
    bad = subprocess.run([sys.executable, "-m", "vmshare.cli.manpage", "--out",
                          str(tmp_path / "no" / "such" / "dir")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("vmshare: error: cannot write")


def test_the_commands_are_not_in_the_main_help(tree: ParserTree) -> None:
    assert not {"manpage", "completion"} & {c.name for c in tree.commands}
