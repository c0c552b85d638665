"""`--plugin MODULE`: import user modules that register their own backbones (and their collators) before a command
reads the registries. MODULE is an importable module name, or a path to a ``.py`` file (its folder is put on
``sys.path`` so that data-loader workers and a later model load import it by the same name)."""
from __future__ import annotations

import importlib
import os
import sys

from .errors import UserInputError


def import_plugin(spec: str) -> str:
    """Import one plug-in; returns its module name. A one-line `UserInputError` when it cannot be imported."""
    name = spec
    if spec.endswith(".py"):
        if not os.path.isfile(spec):
            raise UserInputError("plug-in file not found", spec)
        folder, name = os.path.split(os.path.abspath(spec))
        name = name[:-3]
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        importlib.import_module(name)
    except Exception as exc:  # the user's code: report whatever it raised, in one line
        raise UserInputError(f"--plugin {spec}: cannot import it ({type(exc).__name__}: {exc})") from None
    return name


def load_plugins(argv: list[str] | None) -> list[str]:
    """Import every ``--plugin`` of a command line (before the parser that lists the registered backbones)."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    return [import_plugin(p) for p in known.plugin]
