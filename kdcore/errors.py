"""One exception type for bad user input, and the CLI wrapper that turns it into a clean exit."""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

_Result = TypeVar("_Result")


class UserError(Exception):
    """An input the user can fix: the message names the input and the fix."""


EXIT_USER_ERROR = 2


def user_message(exc: BaseException) -> str:
    """The message of a UserError; one re-raised by a DataLoader worker carries the worker's traceback
    text around it, so only the original message (its last 'UserError: ...' part) is kept."""
    text = str(exc)
    marker = f"{UserError.__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def exit_cleanly_on_user_error(main: Callable[..., _Result]) -> Callable[..., _Result]:
    """Print a UserError as one `error:` line on stderr and exit with code 2 (no traceback).

    Args:
        main: a CLI entry point.

    Returns:
        `main` wrapped: it returns what `main` returns, and exits with `EXIT_USER_ERROR` on a UserError.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> _Result:
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
