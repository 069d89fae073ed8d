"""The `vmshare` parser as plain data: commands, their actions, options and
arguments, read from the argparse definitions so that the man page and the
shell completions are generated from the one parser and cannot drift.

Reading argparse's tree needs its private attributes (``_actions``,
``_choices_actions``); they have been stable since Python 3.2 and typeshed
types them. This module is the only place that relies on them.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

from vmshare.cli.main import build_parser
from vmshare.errors import UsageError

#: metavars whose values are libvirt domain names (completed from virsh)
DOMAIN_METAVARS = frozenset({"DOMAIN"})
#: metavars whose values are paths (completed as files)
PATH_METAVARS = frozenset({"FILE", "PATH", "DIR", "SOCKET"})


@dataclass(frozen=True)
class Option:
    """One optional argument: its flags, the value it takes, its help."""

    flags: tuple[str, ...]
    metavar: str | None        # None: a switch that takes no value
    help: str
    choices: tuple[str, ...] = ()
    value_optional: bool = False   # nargs='?': the value may be left out
    repeatable: bool = False
    required: bool = False

    def usage(self) -> str:
        """``[--flag VALUE]`` with the first long flag, as in a synopsis."""
        flag = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        if self.metavar is None:
            return flag if self.required else f"[{flag}]"
        if self.value_optional:
            return f"[{flag} [{self.metavar}]]"
        return f"{flag} {self.metavar}" if self.required else f"[{flag} {self.metavar}]"


@dataclass(frozen=True)
class Positional:
    """One positional argument."""

    metavar: str
    nargs: str | int | None
    help: str
    choices: tuple[str, ...] = ()

    def usage(self) -> str:
        if self.nargs == "?":
            return f"[{self.metavar}]"
        if self.nargs == "*":
            return f"[{self.metavar}...]"
        if self.nargs == "+":
            return f"{self.metavar}..."
        return self.metavar


@dataclass(frozen=True)
class Command:
    """A command (``ksm``) or one of its actions (``ksm show``)."""

    path: tuple[str, ...]
    help: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]
    actions: tuple[Command, ...] = ()

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def synopsis(self) -> str:
        """``vmshare ksm start [--pages-to-scan PAGES_TO_SCAN] ...``, no global options."""
        parts = ["vmshare", *self.path]
        if self.actions:
            parts.append("|".join(a.path[-1] for a in self.actions))
        parts.extend(opt.usage() for opt in self.options)
        parts.extend(p.usage() for p in self.positionals)
        return " ".join(parts)

    def walk(self) -> Iterator[Command]:
        """This command, then every action below it."""
        yield self
        for action in self.actions:
            yield from action.walk()


@dataclass(frozen=True)
class ParserTree:
    """The whole command line: global options and the commands in help order."""

    prog: str
    description: str
    options: tuple[Option, ...]
    commands: tuple[Command, ...]

    def walk(self) -> Iterator[Command]:
        """Every command and every action, depth first, in help order."""
        for command in self.commands:
            yield from command.walk()


def _help(action: argparse.Action, prog: str) -> str:
    """The help text as argparse would show it (``%(default)s`` expanded)."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in action.choices or ())
    return text % params


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices is not None and not isinstance(action.choices, dict):
        return "|".join(str(c) for c in action.choices)
    return action.dest.upper()


def _choices(action: argparse.Action) -> tuple[str, ...]:
    if action.choices is None or isinstance(action.choices, dict):
        return ()
    return tuple(str(c) for c in action.choices)


def _option(action: argparse.Action, prog: str) -> Option:
    takes_value = action.nargs != 0
    return Option(flags=tuple(action.option_strings),
                  metavar=_metavar(action) if takes_value else None,
                  help=_help(action, prog), choices=_choices(action),
                  value_optional=action.nargs == "?",
                  repeatable=isinstance(action, argparse._AppendAction),
                  required=action.required)


def _visible(action: argparse.Action) -> bool:
    return action.help is not argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[
        argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> tuple[Command, ...]:
    sub = _subparsers(parser)
    if sub is None:
        return ()
    helps = {a.dest: a.help for a in sub._choices_actions}
    commands = []
    for name, child in sub.choices.items():
        if name not in helps or helps[name] is argparse.SUPPRESS:
            continue    # an alias, or a hidden command
        commands.append(_command(child, (*path, name), helps[name] or ""))
    return tuple(commands)


def _command(parser: argparse.ArgumentParser, path: tuple[str, ...], help_text: str) -> Command:
    prog = parser.prog
    options = tuple(_option(a, prog) for a in parser._actions
                    if a.option_strings and _visible(a))
    positionals = tuple(
        Positional(metavar=_metavar(a), nargs=a.nargs, help=_help(a, prog), choices=_choices(a))
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
        and _visible(a))
    return Command(path=path, help=help_text, options=options, positionals=positionals,
                   actions=_commands(parser, path))


def read_parser(parser: argparse.ArgumentParser) -> ParserTree:
    """The tree of ``parser``: global options (``-h`` included) and every command.

    Raises UsageError if the parser has no commands (nothing to document).
    """
    commands = _commands(parser, ())
    if not commands:
        raise UsageError(f"{parser.prog}: the parser has no commands")
    options = tuple(_option(a, parser.prog) for a in parser._actions
                    if a.option_strings and a.help is not argparse.SUPPRESS)
    return ParserTree(prog=parser.prog, description=parser.description or "",
                      options=options, commands=commands)


def vmshare_tree() -> ParserTree:
    """The tree of the real `vmshare` parser."""
    return read_parser(build_parser())


__all__ = ["DOMAIN_METAVARS", "PATH_METAVARS", "Command", "Option", "ParserTree", "Positional",
           "read_parser", "vmshare_tree"]
