"""`make pretrain`'s launcher: torchrun's elastic agent, ending the way `python -m train.pretrain` does.

    python -m tools.launch [--nproc N] [--nnodes N --node-rank R --master-addr A --master-port P] \\
        MODULE [ARGS...]

Single node (`--nnodes 1`, the default): torchrun's `--standalone` rendezvous, a TCP store on a free
port, so two jobs on one machine never collide on a fixed port. Several nodes: the static rendezvous
at `--master-addr:--master-port`, as before.

Each rank hands its ending to this launcher (common.cli.report_to_launcher) instead of printing it;
when a rank fails, the first failed rank's report is printed once: a user error as its one line
`error: ...` (exit status 2), a crash as its traceback with the rank named (exit status 1), and never
torchrun's ChildFailedError summary. A rank that died without a report (a signal, an exit outside
common.cli.run_main) is named with its exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile

from common.cli import LAUNCH_REPORTS_ENV, ArgumentParser, UserError, read_launch_reports, run_main

# Exit statuses with which a rank has already printed its own one-line ending (common.cli's 2 and
# 130, train.pretrain's 3 for a non-finite loss, 128+signal after SIGTERM/SIGINT): nothing to add.
SELF_REPORTED = frozenset({2, 3, 130, 128 + signal.SIGTERM, 128 + signal.SIGINT})


def positive_int(text: str) -> int:
    """argparse type: argparse names the option in its message (`argument --nproc: ...`)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def torchrun_argv(args) -> list[str]:
    """The torchrun command line (without the program name) for this launch."""
    if args.nnodes == 1:
        where = ["--standalone"]
    else:
        if not (0 <= args.node_rank < args.nnodes):
            raise UserError(f"NODE_RANK={args.node_rank} must be in [0, NNODES={args.nnodes})")
        where = [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port}",
        ]
    return [*where, f"--nproc-per-node={args.nproc}", "-m", args.module, *args.module_args]


def failure_ending(reports: list[dict], failures: dict) -> tuple[str, int]:
    """(what to print, exit status) for a failed launch: the earliest rank report, else the first
    failure torchrun observed. `failures`: global rank -> torch's ProcessFailure."""
    if reports:
        first = reports[0]
        if first["kind"] == "user":
            return first["text"], 2
        return f"error: rank {first['rank']} crashed:\n{first['text'].rstrip()}", 1
    # The agent stops the surviving ranks with SIGTERM once one failed: those are not the cause.
    rank = min(failures, key=lambda r: (failures[r].exitcode == -signal.SIGTERM, failures[r].timestamp, r))
    code = failures[rank].exitcode
    if code < 0:
        hint = " (out of memory?)" if code == -signal.SIGKILL else ""
        return f"error: rank {rank} was killed by {failures[rank].signal_name()}{hint}", 128 - code
    if code in SELF_REPORTED:
        return "", code
    return f"error: rank {rank} exited with status {code} (its output is above)", code


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=positive_int, default=1, help="processes (GPUs) on this node")
    parser.add_argument("--nnodes", type=positive_int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1", help="multi-node only")
    parser.add_argument("--master-port", type=positive_int, default=29500, help="multi-node only")
    parser.add_argument("module", help="the entry point's module, e.g. train.pretrain")
    parser.add_argument("module_args", nargs="...", help="its arguments, as given")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # Imported here: torch's import is seconds, and a usage error above should not wait for it.
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent logs every worker failure (and the shutdown of its peers) as it sees it; the
    # ending below says what matters once. Its loggers set their own level (torch's get_logger reads
    # LOGLEVEL), so each one is quietened, not just their parent.
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.nproc > 1:
        # What torchrun does when it is unset (one thread per rank, not one per core per rank),
        # without its four-line banner in front of every message.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    folder = tempfile.mkdtemp(prefix="g2d-launch-")
    os.environ[LAUNCH_REPORTS_ENV] = folder  # the workers inherit it
    try:
        try:
            torchrun.run(torchrun.parse_args(torchrun_argv(args)))
        except ChildFailedError as exc:
            text, code = failure_ending(read_launch_reports(folder), exc.failures)
        except SignalException as exc:  # Ctrl-C / kill: torchrun forwarded it; each rank said so
            return 128 + int(exc.sigval)
        else:
            return 0
    finally:
        del os.environ[LAUNCH_REPORTS_ENV]  # this process's own ending is printed, not reported
        shutil.rmtree(folder, ignore_errors=True)
    if text:
        print(text, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    run_main(main)
