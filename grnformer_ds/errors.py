"""User-facing errors: one line, naming the file and the problem, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserInputError(ValueError):
    """A mistake in the user's input (file, flag, config). CLIs print it as one line and exit with status 2."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI entry point: a `UserInputError` becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except UserInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        return int(rc or 0)

    return wrapper
