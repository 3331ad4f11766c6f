"""One way for every entry point to end: a user error is one line `error: ...` and exit status 2.

    def main(argv=None) -> int: ...
    if __name__ == "__main__":
        run_main(main)

`UserError` (and the exception types listed in `USER_ERRORS`) mean the input was wrong: a bad config
key or type, a missing file, a malformed checkpoint. They print `error: <message>` on stderr and exit 2,
with no traceback. Anything else is a bug and keeps its traceback. `--debug` on the command line (it
is removed before `main` sees argv) or `G2D_DEBUG=1` re-raises user errors too, with the traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input from the user (file, key, path, value): reported as one line, exit status 2."""


# Raised by our loaders for bad input; each message names the file/key/path at fault.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
# OSErrors about where the output goes, not about the code: a full disk or quota, a read-only
# filesystem. strerror and the file name say all there is to say.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (bad value, missing or unknown argument) raise `UserError`, so
    `run_main` prints them as the same one line `error: ...` (exit 2) as every other user error."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("G2D_DEBUG", "") not in ("", "0")


def run_main(
    main: Callable[[list[str] | None], int | None],
    argv: list[str] | None = None,
    extra_errors: tuple[type[BaseException], ...] = (),
) -> None:
    """Call `main(argv)` and exit with its status; user errors become `error: ...`, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
    except USER_ERRORS + extra_errors as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if debug or exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0 if code is None else int(code))
