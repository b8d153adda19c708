"""What the command line needs beyond argparse: overrides anywhere on the line, and the version."""
from __future__ import annotations

import argparse

from pipeline.config import REPO_ROOT


def version() -> str:
    """The installed package's version (the source tree's pyproject when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed("twotower-pipeline")
    except PackageNotFoundError:
        import re
        found = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
        return found.group(1) if found else "unknown"


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with overrides allowed anywhere: a command's own arguments are parsed intermixed
    (`run --force export train.max_steps=5` is `run train.max_steps=5 --force export`), which
    argparse cannot do through subparsers, so the command's parser is picked first."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # --help, --version, or an unknown command: argparse's own message
