"""One exception type for bad user input, and the CLI wrapper that turns it into a clean exit."""
import functools
import sys


class UserError(Exception):
    """An input the user can fix: the message names the input and the fix."""


EXIT_USER_ERROR = 2


def exit_cleanly_on_user_error(main):
    """Print a UserError as one `error:` line on stderr and exit with code 2 (no traceback)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
