"""User-facing errors: one line, naming the file and the problem, never a traceback."""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable


class UserInputError(ValueError):
    """A mistake in the user's input (file, flag, config). CLIs print it as one line and exit with status 2."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def from_worker(exc: UserInputError) -> UserInputError:
    """A `UserInputError` raised in a DataLoader worker comes back with the worker's traceback in its message: keep
    the original one line."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = [line for line in text.splitlines() if line.strip()][-1]
    for marker in ("StoreDamagedError: ", "UserInputError: "):
        if marker in last:
            last = last.split(marker, 1)[1]
            break
    return UserInputError(last)


def load_json_object(path: str | Path, what: str, missing: str | None = None) -> dict[str, Any]:
    """The JSON object stored at `path`; a missing, unreadable or invalid file, or JSON that is not an object, is a
    one-line `UserInputError` naming the file (`what` names the kind of file, `missing` replaces the not-found text)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(missing or f"{what} not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"unreadable {what} ({exc.__class__.__name__}: {exc})", str(path)) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"invalid JSON at line {exc.lineno} column {exc.colno} of the {what}: {exc.msg}",
                             str(path)) from None
    if not isinstance(obj, dict):
        raise UserInputError(f"the {what} must be a JSON object, got {type(obj).__name__}", str(path))
    return obj


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI entry point: a `UserInputError` becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except UserInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            # zarr reads a range's chunks as asyncio tasks on its own loop; when one chunk fails (a damaged shard)
            # its siblings may still be pending when the process exits, and asyncio would add a "Task was destroyed
            # but it is pending!" report for each under the one line
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        return int(rc or 0)

    return wrapper
