"""Shell completion generated from the parser, run in the real shells.

bash: the generated script is sourced, COMP_WORDS/COMP_CWORD are set as bash
sets them, the function runs and COMPREPLY is read back. zsh: the script must
parse (``zsh -n``) and define the ``#compdef`` function.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmshare.cli import completion
from vmshare.cli.parsertree import Command, ParserTree, vmshare_tree

ROOT = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash")
ZSH = shutil.which("zsh")
VIRSH = shutil.which("virsh")
TREE = vmshare_tree()
# COMP_WORDS from the arguments, the cursor on the last one, COMPREPLY out one per line
DRIVER = ('source "$SCRIPT"; COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); '
          '_vmshare; printf "%s\\n" "${COMPREPLY[@]}"')


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if BASH is None:
        pytest.skip("bash is not installed")
    path = tmp_path_factory.mktemp("completion") / "vmshare.bash"
    path.write_text(completion.bash_script(TREE))
    return path


def complete(script: Path, *words: str, path: str | None = None,
             cwd: Path | None = None) -> list[str]:
    """What bash offers for ``words`` (the last one is being completed)."""
    env = {**os.environ, "SCRIPT": str(script)}
    if path is not None:
        env["PATH"] = path
    done = subprocess.run([str(BASH), "--norc", "--noprofile", "-c", DRIVER, "bash", *words],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return sorted(w for w in done.stdout.split("\n") if w)


def fake_virsh(tmp: Path, names: list[str]) -> str:
    """A PATH whose virsh records its arguments and lists ``names``."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    virsh = bin_dir / "virsh"
    listing = "".join(f"{n}\n" for n in names) + "\n"     # virsh ends with an empty line
    virsh.write_text(f"#!/bin/sh\necho \"$@\" > {tmp}/virsh-args\nprintf '%s' '{listing}'\n")
    virsh.chmod(0o755)
    return f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"


def test_top_level_commands(bash_script: Path) -> None:
    assert complete(bash_script, "vmshare", "") == sorted(c.name for c in TREE.commands)
    assert complete(bash_script, "vmshare", "re") == ["remerge", "report"]
    assert complete(bash_script, "vmshare", "-c", "qemu:///system", "ks") == ["ksm"]


def test_actions_of_ksm_policy_and_hook(bash_script: Path) -> None:
    assert complete(bash_script, "vmshare", "ksm", "") == sorted(
        ["show", "start", "stop", "unmerge", "set"])
    assert complete(bash_script, "vmshare", "ksm", "s") == ["set", "show", "start", "stop"]
    assert complete(bash_script, "vmshare", "policy", "") == ["adopt", "set", "show"]
    assert complete(bash_script, "vmshare", "hook", "") == ["install", "status", "uninstall"]


def test_options_of_enable(bash_script: Path) -> None:
    assert complete(bash_script, "vmshare", "enable", "-") == sorted(
        ["--backend", "--json", "-h", "--help"])
    assert complete(bash_script, "vmshare", "ksm", "unmerge", "--") == ["--force", "--help"]
    assert "--restart-libvirtd" in complete(bash_script, "vmshare", "hook", "install", "--")


@pytest.mark.parametrize("command", list(TREE.walk()), ids=lambda c: c.name)
def test_every_command_offers_exactly_its_options(bash_script: Path, command: Command) -> None:
    words = ["vmshare", *command.path, "-"]
    want = {f for opt in command.options for f in opt.flags} | {"-h", "--help"}
    assert set(complete(bash_script, *words)) == want


def test_global_options_before_the_command(bash_script: Path) -> None:
    offered = set(complete(bash_script, "vmshare", "-"))
    assert offered == {f for opt in TREE.options for f in opt.flags}
    assert {"--version", "-v", "--deadline"} <= offered


def test_choices_and_files(bash_script: Path, tmp_path: Path) -> None:
    assert complete(bash_script, "vmshare", "policy", "set", "--merge", "") == [
        "inherit", "off", "on"]
    # --merge=o: bash's COMP_WORDS split at '='
    assert complete(bash_script, "vmshare", "policy", "set", "--merge", "=", "o") == [
        "off", "on"]
    (tmp_path / "guest.core").write_text("")
    assert complete(bash_script, "vmshare", "predict", "--dump", "gu", cwd=tmp_path) == [
        "guest.core"]
    assert complete(bash_script, "vmshare", "demo", "--guests", "") == []   # a number


def test_domains_from_virsh_default_uri(bash_script: Path, tmp_path: Path) -> None:
    path = fake_virsh(tmp_path, ["web-1", "web-2", "db"])
    assert complete(bash_script, "vmshare", "enable", "", path=path) == ["db", "web-1", "web-2"]
    assert (tmp_path / "virsh-args").read_text().split() == [
        "-q", "-c", completion.DEFAULT_URI, "list", "--all", "--name"]
    assert complete(bash_script, "vmshare", "status", "web-1", "w", path=path) == [
        "web-1", "web-2"]
    assert complete(bash_script, "vmshare", "policy", "set", "d", path=path) == ["db"]


def test_domains_follow_connect_and_not_qmp(bash_script: Path, tmp_path: Path) -> None:
    path = fake_virsh(tmp_path, ["vm"])
    assert complete(bash_script, "vmshare", "-c", "test:///default", "disable", "",
                    path=path) == ["vm"]
    assert "test:///default" in (tmp_path / "virsh-args").read_text().split()
    assert complete(bash_script, "vmshare", "--qmp", "/run/q.sock", "enable", "",
                    path=path) == []


def test_domains_from_the_real_virsh(bash_script: Path) -> None:
    if VIRSH is None:
        pytest.skip("virsh is not installed (integration/setup.sh installs libvirt-clients)")
    # libvirt's test driver: one domain, "test", whatever else runs on this host
    assert complete(bash_script, "vmshare", "-c", "test:///default", "enable", "") == ["test"]


def test_zsh_script_parses_and_defines_its_functions(tmp_path: Path) -> None:
    if ZSH is None:
        pytest.skip("zsh is not installed (integration/setup.sh installs it)")
    script = completion.zsh_script(TREE)
    assert script.startswith("#compdef vmshare\n")
    path = tmp_path / "_vmshare"
    path.write_text(script)
    parsed = subprocess.run([ZSH, "-n", str(path)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert parsed.returncode == 0 and parsed.stderr == "", parsed.stderr
    broken = tmp_path / "_broken"
    broken.write_text(script.replace("esac", "", 1))
    assert subprocess.run([ZSH, "-n", str(broken)], capture_output=True, timeout=30,
                          check=False).returncode != 0       # zsh -n does catch a break
    for command in TREE.walk():
        assert f"{completion._zsh_func(command)}() {{" in script, command.name


# Runs an interactive zsh on a pty (zsh/zpty), types the line and a TAB, and
# prints every match the completion offered: compadd is wrapped to echo them,
# and a comppostfuncs hook marks the end of the completion.
ZSH_CAPTURE = r"""
zmodload zsh/zpty || exit 3
zpty z zsh -f -i
zpty -w z "PS1='' PROMPT='' RPROMPT=''; unsetopt zle_bell; fpath=($1 \$fpath)"
zpty -w z 'autoload -Uz compinit; compinit -u -D'
zpty -w z 'compadd () { if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then
  builtin compadd "$@"; return $?; fi; typeset -a hits; builtin compadd -A hits "$@";
  (( $#hits )) || return 1; print -rl -- ${(@)hits/#/HIT:}; }'
zpty -w z '_capture_done() { print DONE-CAPTURE; }; comppostfuncs=(_capture_done)'
zpty -w z 'zstyle ":completion:*" list-prompt ""; print READY-CAPTURE'
zpty -r z line '*READY-CAPTURE*'
zpty -w -n z "$2"$'\t'
while zpty -r z line; do
  [[ $line == *DONE-CAPTURE* ]] && break
  [[ $line == *HIT:* ]] && print -r -- ${${line##*HIT:}%%$'\r'}
done
zpty -d z
"""


@pytest.fixture(scope="module")
def zsh_fpath(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if ZSH is None:
        pytest.skip("zsh is not installed (integration/setup.sh installs it)")
    fpath = tmp_path_factory.mktemp("fpath")
    (fpath / "_vmshare").write_text(completion.zsh_script(TREE))
    (fpath / "capture.zsh").write_text(ZSH_CAPTURE)
    return fpath


def zsh_complete(fpath: Path, line: str) -> list[str]:
    """What zsh offers for ``line`` (typed into an interactive zsh, then TAB)."""
    done = subprocess.run([str(ZSH), "-f", str(fpath / "capture.zsh"), str(fpath), line],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return sorted(w for w in done.stdout.split("\n") if w.strip())


def test_zsh_completes_in_a_real_shell(zsh_fpath: Path) -> None:
    assert zsh_complete(zsh_fpath, "vmshare ") == sorted(c.name for c in TREE.commands)
    assert zsh_complete(zsh_fpath, "vmshare ksm ") == sorted(
        ["show", "start", "stop", "unmerge", "set"])
    assert zsh_complete(zsh_fpath, "vmshare enable -") == sorted(
        ["--backend", "--json", "-h", "--help"])
    assert zsh_complete(zsh_fpath, "vmshare policy set --merge ") == ["inherit", "off", "on"]


def test_zsh_completes_domains_through_the_connect_uri(zsh_fpath: Path) -> None:
    if VIRSH is None:
        pytest.skip("virsh is not installed (integration/setup.sh installs libvirt-clients)")
    assert zsh_complete(zsh_fpath, "vmshare -c test:///default enable ") == ["test"]
    assert zsh_complete(zsh_fpath, "vmshare --qmp /run/q.sock enable ") == []


def test_the_module_prints_both(tmp_path: Path) -> None:
    for shell, check in (("bash", "complete -F _vmshare vmshare"), ("zsh", "#compdef vmshare")):
        done = subprocess.run([sys.executable, "-m", "vmshare.cli.completion", shell], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and check in done.stdout, done.stderr
    bad = subprocess.run([sys.executable, "-m", "vmshare.cli.completion", "fish"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_the_bash_script_parses(bash_script: Path) -> None:
    assert subprocess.run([str(BASH), "-n", str(bash_script)], timeout=30).returncode == 0


def _tree_has_domain_arguments(tree: ParserTree) -> bool:
    return any(p.metavar == "DOMAIN" for c in tree.walk() for p in c.positionals)


def test_domain_arguments_exist() -> None:
    """The domain completion above is exercised only if some command takes a DOMAIN."""
    assert _tree_has_domain_arguments(TREE)
