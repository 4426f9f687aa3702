"""The ``talr`` command line.

Each sub-command lives in its own module under ``experiments/commands/`` and exposes
``register(subparsers)``; that function adds its parser and sets ``func`` to a handler
``handler(args) -> int``. Modules are imported lazily so ``talr bounds`` never imports torch.

Errors, one convention: a mistake of the user's (a bad option, a missing or malformed file) is
raised as `UserError` (or converted to it with `user_errors`), and `main` prints it as one line
``talr CMD: message`` on stderr and returns 2, with no traceback; argparse's own errors take the
same form. Anything else is a bug of talr and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from contextlib import contextmanager

# sub-command name -> module under experiments.commands
COMMANDS = {
    "bounds": "theory_cmds",
    "simulate": "theory_cmds",
    "claims": "theory_cmds",
    "train": "train",
    "analyze": "analyze",
    "compare": "compare",
    "demo": "demo_cmd",
    "forecast": "forecast",
    "advise": "forecast",
    "forecast-cost": "forecast",
    "study": "study",
}


class UserError(Exception):
    """A mistake in the command line or its input files; `main` prints ``talr CMD: message``, exits 2."""


@contextmanager
def user_errors(*types: type[BaseException]):
    """Re-raise the given exception types (a library's errors that name file, line and field) as
    `UserError` with the same message."""
    try:
        yield
    except types as exc:
        raise UserError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    """argparse with the error convention: one line ``talr CMD: message``, exit status 2."""

    def error(self, message: str):  # noqa: D401 (argparse's name)
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("talr")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="talr",
        description="Domain-specific SFT, measured against the theory of arXiv 2509.20758.",
    )
    parser.add_argument("--version", action="version", version=f"talr {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    # Only import the module of the requested command (keeps `talr bounds` torch-free).
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
        if wanted is None and "--version" in argv:
            return parser  # nothing else to import
    seen = set()
    for name, mod in COMMANDS.items():
        if mod in seen or (wanted in COMMANDS and COMMANDS[wanted] != mod):
            continue
        seen.add(mod)
        try:
            module = importlib.import_module(f"experiments.commands.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("experiments.commands"):
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """``CMD`` of the prefix: the sub-command and its sub-sub-command (``bounds degradation``)."""
    parts = [getattr(args, "command", None), getattr(args, "bound", None), getattr(args, "study", None)]
    return " ".join(p for p in parts if p)


def fail(cmd: str, message: str) -> int:
    """Print the one line ``talr CMD: message`` on stderr; return the exit status 2."""
    prefix = f"talr {cmd}: "
    text = " ".join(str(message).split("\n")).strip()
    print(prefix + (text[len(prefix):] if text.startswith(prefix) else text), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        return fail(command_name(args), str(exc))


if __name__ == "__main__":
    sys.exit(main())
