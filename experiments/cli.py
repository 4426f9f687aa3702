"""The ``talr`` command line.

Each sub-command lives in its own module under ``experiments/commands/`` and exposes
``register(subparsers)``; that function adds its parser and sets ``func`` to a handler
``handler(args) -> int``. Modules are imported lazily so ``talr bounds`` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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
    "study": "study",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="talr",
        description="Domain-specific SFT, measured against the theory of arXiv 2509.20758.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only import the module of the requested command (keeps `talr bounds` torch-free).
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
