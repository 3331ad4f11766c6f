"""One way for every entry point to end: a user error is one line `error: ...` and exit status 2.

    def main(argv=None) -> int: ...
    if __name__ == "__main__":
        run_main(main)

`UserError` (and the exception types listed in `USER_ERRORS`) mean the input was wrong: a bad config
key or type, a missing file, a malformed checkpoint. They print `error: <message>` on stderr and exit 2,
with no traceback. Anything else is a bug and keeps its traceback. `--debug` on the command line (it
is removed before `main` sees argv) or `G2D_DEBUG=1` re-raises user errors too, with the traceback.

Under tools/launch.py (`make pretrain`), which sets `G2D_LAUNCH_REPORTS` to a folder, a worker does
not print its ending itself: it writes it to `<folder>/rank<RANK>.json` (`report_to_launcher`), and
the launcher prints the first failed rank's report once. With N ranks failing alike, the user still
reads one `error:` line (or one traceback, with its rank named) instead of N, and no torchrun trace.
A rank that torchrun stops (SIGTERM) because a peer failed says nothing (`stop_on_signal`).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import typing
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


LAUNCH_REPORTS_ENV = "G2D_LAUNCH_REPORTS"


def report_to_launcher(kind: str, text: str) -> bool:
    """Hand this rank's ending (`kind` "user": the `error: ...` line; "crash": a traceback) to the
    launcher that set G2D_LAUNCH_REPORTS; False when there is none (or the folder is unwritable), and
    the caller prints it itself."""
    folder = os.environ.get(LAUNCH_REPORTS_ENV)
    if not folder:
        return False
    rank = os.environ.get("RANK", "0")
    report = {"rank": rank, "kind": kind, "text": text, "time": time.time()}
    try:
        # Temp file + rename: the launcher never reads half a report.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".rank{rank}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(report, fh)
        os.replace(tmp, os.path.join(folder, f"rank{rank}.json"))
    except OSError:
        return False
    return True


def read_launch_reports(folder: str) -> list[dict]:
    """The reports ranks left in `folder`, earliest first (ties: lowest rank)."""
    reports = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("rank") and name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                reports.append(json.load(fh))
    return sorted(reports, key=lambda r: (r["time"], int(r["rank"])))


def peer_reported() -> bool:
    """Whether, under the launcher, another rank has already handed over its ending: torchrun then
    stops this rank (SIGTERM) because that peer failed, and the peer's report is what the user needs."""
    folder = os.environ.get(LAUNCH_REPORTS_ENV)
    if not folder:
        return False
    own = f"rank{os.environ.get('RANK', '0')}.json"
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(n.startswith("rank") and n.endswith(".json") and n != own for n in names)


def stop_on_signal(note: str) -> Callable:
    """A SIGTERM handler: raise SystemExit(128 + signum) in the main thread (between bytecodes, so
    `finally` blocks and atomic writers clean up, as for Ctrl-C's KeyboardInterrupt), after the line
    `error: stopped by <SIGNAL>; <note>`. Quiet when a peer rank already reported: the launcher prints
    that rank's line, and this one would come before it."""

    def handler(signum, frame) -> None:
        if not peer_reported():
            print(f"error: stopped by {signal.Signals(signum).name}; {note}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    return handler


def _end_with_error(line: str, code: int) -> None:
    if not report_to_launcher("user", line):
        print(line, file=sys.stderr)
    sys.exit(code)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--<field-name>` option per field of dataclass `cls`, so a command's options and their
    defaults live in one dataclass: the type from the annotation (`int | None` -> int), the default
    from the field, the help from `metadata["help"]`; a bool field is a store_true flag."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f.metadata.get("help")
        tp = hints[f.name]
        if tp is bool:
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        parser.add_argument(flag, type=args[0] if args else tp, default=default, help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace):
    """`cls` filled from the options `add_dataclass_arguments` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


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
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        user = isinstance(exc, USER_ERRORS + extra_errors) or (
            isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS
        )
        if user and not debug:
            _end_with_error(f"error: {exc}", 2)
        # A bug (or --debug): under the launcher its traceback is printed once, by the launcher,
        # naming the rank; otherwise Python prints it as usual.
        if not report_to_launcher("crash", traceback.format_exc()):
            raise
        sys.exit(1)
    sys.exit(0 if code is None else int(code))
