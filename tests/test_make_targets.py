"""The make targets as a user types them (issue #29): `make pretrain` ends a user error with one
`error: ...` line and exit status 2 (make's own `make: *** ... Error 2` line may follow), never
torchrun's ChildFailedError; a crash names its rank once; two single-node jobs run side by side
(no fixed rendezvous port); ARGS reaches the command word by word, as typed (no brace expansion,
globbing, `;` or `$` expansion), so the README's streaming row reads every shard.
Each case is a row of docs/reliability.md's "As the user meets it" table."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.run_layout import list_checkpoints
from tests.pipeline_fixtures import MAKE_ERROR_LINE, ROOT, child_env, pack_tiny, shell_env
from tests.test_reliability_train import payload, run_overrides
from tests.test_remote_shards import Handler

DEMO = "configs/pretrain/demo.yaml"
pytestmark = pytest.mark.skipif(
    not list((ROOT / ".venv").glob(".setup-*")), reason="make setup has not run here (make would install the venv)"
)


def make(*words: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *words],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=shell_env(OMP_NUM_THREADS="1", G2D_DEBUG=""),
    )


def start_make(*words: str) -> subprocess.Popen:
    """make in its own process group (stopped with killpg, as Ctrl-C stops a terminal's job)."""
    return subprocess.Popen(
        ["make", "--no-print-directory", *words],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=shell_env(OMP_NUM_THREADS="1", G2D_DEBUG=""),
        start_new_session=True,
    )


# What a run may print before its error: common/log.py's records, and transformers' tqdm bar while it
# loads the text model ("Loading weights: 100%|...| 37/37 [00:00<00:00, ...it/s]").
LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) \[rank \d+\] |^Loading weights: .*it/s\]$")


def assert_one_line(code: int, stderr: str, *needles: str, status: int = 2) -> str:
    """One `error: ...` line holding every needle, last but for make's own `make: ***` line; before
    it only the run's log records (a warning about the input may precede the error), no traceback."""
    lines = [ln.rsplit("\r", 1)[-1] for ln in stderr.splitlines()]  # a tqdm bar's last state
    lines = [ln for ln in lines if ln.strip() and not MAKE_ERROR_LINE.match(ln)]
    assert code == status and lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert all(LOG_RECORD.match(ln) for ln in lines[:-1]), stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def pretrain_args(out: Path, shards="unused", bert="unused", **extra) -> str:
    return " ".join(run_overrides(out, shards, bert, **extra))


# ---- user errors: one line through make -----------------------------------------------------

# Billion laughs: nine levels of ten aliases each, 10**9 values from a few hundred bytes, where a
# string belongs (the schema check used to walk them all to print the value it refused).
LAUGHS = (
    "train:\n  output_dir: ["
    + ", ".join(
        ["&a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    )
    + "]\n"
)


CONFIG_CASES = {  # ARGS= -> what the one line names
    "train.no_such_key=1": ["unknown key", "no_such_key"],
    "train.checkpoint_every=0": ["train.checkpoint_every=0 must be >= 1"],
    "train.seed=99999999999999999999999": ["train.seed=99999999999999999999999 must be in [0, 2**31)"],
    "model.decoder_channels=[8,4]": ["model.decoder_channels=(8, 4) must be 5 widths"],
    "train.log_every=1 train.log_every=2": ["train.log_every is given twice", "'train.log_every=2'"],
    "train.output_dir=!!python/name:os.system": ["train.output_dir", "not valid YAML", "python/name"],
}


def in_parallel(commands: dict) -> dict:
    """{case: make's CompletedProcess}, the cases run at once (each is seconds of imports)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(make, *words) for case, words in commands.items()}
        return {case: future.result() for case, future in futures.items()}


def test_config_errors_are_one_line(tmp_path):
    """`make pretrain ARGS=...` exactly as the issue typed them, with the default CONFIG; and a
    CONFIG= file whose YAML aliases expand to a billion values."""
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text(LAUGHS)
    commands = {extra: ("pretrain", f"ARGS={extra}") for extra in CONFIG_CASES}
    done = in_parallel({**commands, "laughs": ("pretrain", f"CONFIG={bomb}")})
    for extra, needles in CONFIG_CASES.items():
        assert_one_line(done[extra].returncode, done[extra].stderr, *needles)
    assert_one_line(done["laughs"].returncode, done["laughs"].stderr, str(bomb), "more than 10000 values")


def test_args_arrive_as_typed(tmp_path):
    """No brace expansion, globbing, `$` expansion (by make or bash) or command execution: the
    value comes back verbatim in the error, and the command after `;` never runs."""
    (tmp_path / "a").mkdir()
    pwned = tmp_path / "pwned"
    value = f"$HOME/{{000..009}}/{tmp_path}/*/$(id)/`id`"
    done = make("pretrain", f"ARGS=train.epochs={value}")
    assert_one_line(done.returncode, done.stderr, f"train.epochs: expected an int, got '{value}'")
    done = make("pretrain", f"ARGS=train.no_such_key=1 x; touch {pwned}")
    assert_one_line(done.returncode, done.stderr, "override 'x;' must look like key.sub=value")
    assert not pwned.exists()


def test_run_setup_errors_are_one_line(mimic_shards, tiny_bert, tmp_path):
    """Errors found once the run starts (text model, resume checkpoint, data size): one line too."""
    import torch

    other = tmp_path / "other.pt"
    torch.save(payload(5, "x", config={"model": {"name": "g2d_tiny", "image_size": 96}}), other)
    pack_tiny(tmp_path / "small", n_train=36, n_valid=8)
    gone = tmp_path / "gone.pt"
    cases = {  # case -> (ARGS, what the one line names)
        "missing text model": (
            pretrain_args(tmp_path / "r1", mimic_shards, tmp_path / "nope"),
            ["does not exist", "make tiny-bert"],
        ),
        "resume from a missing file": (
            pretrain_args(tmp_path / "r2", mimic_shards, tiny_bert, **{"train.resume": gone}),
            [str(gone), "not found"],
        ),
        "resume from another model": (
            pretrain_args(tmp_path / "r3", mimic_shards, tiny_bert, **{"train.resume": other}),
            [str(other), "different model config"],
        ),
        "batch over the dataset": (
            pretrain_args(tmp_path / "r4", tmp_path / "small", tiny_bert, **{"train.batch_size_per_gpu": 64}),
            ["batch_size_per_gpu=64", "has 36", "lower train.batch_size_per_gpu"],
        ),
    }
    done = in_parallel({case: ("pretrain", f"CONFIG={DEMO}", f"ARGS={args}") for case, (args, _) in cases.items()})
    for case, (_, needles) in cases.items():
        assert_one_line(done[case].returncode, done[case].stderr, *needles)


# ---- jobs side by side ----------------------------------------------------------------------


def test_two_jobs_side_by_side_and_a_second_trainer_on_one_folder(mimic_shards, tiny_bert, tmp_path):
    """A long job holds runs/a; a short job in runs/c starts beside it and finishes (each picks its
    own rendezvous port); a second trainer on runs/a gets one line; the long job then stops cleanly."""
    long_out, short_out = tmp_path / "a", tmp_path / "c"
    long_job = start_make(
        "pretrain", f"CONFIG={DEMO}", f"ARGS={pretrain_args(long_out, mimic_shards, tiny_bert)} train.max_steps=100000"
    )
    try:
        short_args = f"{pretrain_args(short_out, mimic_shards, tiny_bert)} train.max_steps=2"
        short = make("pretrain", f"CONFIG={DEMO}", f"ARGS={short_args}")
        assert short.returncode == 0, short.stderr[-3000:]
        assert json.loads(short.stdout[short.stdout.index("{") :])["final_step"] == 2
        deadline = time.time() + 120
        while not list_checkpoints(long_out / "checkpoints"):
            assert long_job.poll() is None and time.time() < deadline, long_job.communicate()[1][-3000:]
            time.sleep(0.2)
        second = make("pretrain", f"CONFIG={DEMO}", f"ARGS={pretrain_args(long_out, mimic_shards, tiny_bert)}")
        assert_one_line(second.returncode, second.stderr, str(long_out), "another")
        assert long_job.poll() is None, "the second trainer disturbed the first"
    finally:
        os.killpg(long_job.pid, signal.SIGTERM)
        _, err = long_job.communicate(timeout=120)
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    assert not list(long_out.rglob("*.tmp"))


# ---- the README's streaming row -------------------------------------------------------------


@pytest.fixture
def served_mimic(mimic_shards):
    """(base URL, request log): mimic_shards over HTTP on 127.0.0.1."""
    Handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(mimic_shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Handler.requests
    server.shutdown()


def test_readme_streaming_row_reads_every_shard(served_mimic, mimic_shards, tiny_bert, tmp_path):
    base, requests = served_mimic
    manifest = json.loads((mimic_shards / "manifest.json").read_text())
    names = sorted(s["name"] if isinstance(s, dict) else s for s in manifest["splits"]["train"]["shards"])
    first, last = names[0].rsplit("-", 1)[1][:6], names[-1].rsplit("-", 1)[1][:6]
    assert len(names) >= 3 and names[0].startswith("train/train-"), names
    spec = f"{base}/train/train-{{{first}..{last}}}.tar"  # as the README writes it: bash would expand it
    args = pretrain_args(tmp_path / "run", spec, tiny_bert, **{"train.max_steps": 0, "train.epochs": 1})
    done = make("pretrain", f"CONFIG={DEMO}", f"ARGS={args}")
    assert done.returncode == 0, done.stderr[-3000:]
    read = {path.lstrip("/") for path in requests if path.endswith(".tar")}
    assert set(names) <= read, (names, sorted(read))


# ---- the launcher's endings (a light worker: no torch import in the ranks) ------------------


def test_a_stopped_launcher_prints_no_agent_log(tmp_path):
    """SIGTERM (or Ctrl-C) on the launcher: torchrun stops the ranks; none of the agent's log lines."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tools.launch", "--nproc", "2", "tests.launch_worker", "wait", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(G2D_DEBUG=""),
    )
    deadline = time.time() + 120
    while not ((tmp_path / "rank0").exists() and (tmp_path / "rank1").exists()):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM and "torch/distributed" not in err, err


def launch(mode: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.launch", "--nproc", "2", "tests.launch_worker", mode, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(G2D_DEBUG=""),
    )


def test_launcher_prints_each_ending_once():
    done = launch("user")  # both ranks fail alike: one line
    assert_one_line(done.returncode, done.stderr, "bad input seen by rank")
    done = launch("crash")  # a bug: its traceback once, the rank named
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("Traceback") == 1 and "error: rank 1 crashed:" in done.stderr, done.stderr
    assert "RuntimeError: boom on rank 1" in done.stderr and "ChildFailedError" not in done.stderr
    done = launch("kill")  # no report: the rank and its signal, not the peer the agent stopped
    assert_one_line(done.returncode, done.stderr, "rank 1 was killed by SIGKILL", status=137)
    done = launch("ok")
    # each rank's line once; the ranks share stdout, so only the counts are certain, not the order
    assert done.returncode == 0 and [done.stdout.count(f"rank {r} ok") for r in (0, 1)] == [1, 1], done


def test_rank_stopped_for_a_failed_peer_stays_quiet(tmp_path):
    """Only rank 0 fails: torchrun stops rank 1 with SIGTERM, and rank 1's trainer handler (which
    says `error: stopped by SIGTERM; ...` when the user stops a run) adds no line before rank 0's."""
    done = launch("first", str(tmp_path))
    assert (tmp_path / "rank1").exists()  # rank 1 had its handler before rank 0 failed
    assert_one_line(done.returncode, done.stderr, "bad input seen by rank 0 only")
    assert "stopped by SIGTERM" not in done.stderr, done.stderr


# ---- packing options: one home (shards.mimic.PackOptions) ----------------------------


def make_argv(tmp_path: Path, *words: str) -> list[str]:
    """The argv a make target gives its command (PY= replaced by a script that prints it)."""
    echo = tmp_path / "echo_argv"
    echo.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o755)
    done = make("-s", *words, f"PY={echo}")
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_make_shards_takes_the_packing_defaults_from_pack_options(tmp_path):
    from common.cli import dataclass_from_args
    from shards.mimic import PackOptions
    from tools.pack_shards import ShardsOptions, build_parser

    def options(*words: str) -> ShardsOptions:
        argv = make_argv(tmp_path, "shards", *words)
        assert argv[:2] == ["-m", "tools.pack_shards"], argv
        return dataclass_from_args(ShardsOptions, build_parser().parse_args(argv[2:]))

    # What the Makefile used to pass explicitly (--max-side 256 --quality 90 --seed 0 --synth-n 400
    # --synth-size 2048): the same options, so `make shards` writes the same bytes.
    got = options()
    assert (got.max_side, got.quality, got.seed, got.synth_n, got.synth_size) == (256, 90, 0, 400, 2048)
    assert got == ShardsOptions(seed=0)  # every other default is the dataclass's
    # What pack_mimic receives: PackOptions' own defaults but the command's (shard size by source).
    assert got.packing(16) == PackOptions(seed=0, workers=got.workers, samples_per_shard=16)
    got = options("MAX_SIDE=300", "QUALITY=80", "N=7", "SIZE=512", "WORKERS=1", "SEED=5")
    assert (got.max_side, got.quality, got.synth_n, got.synth_size, got.workers, got.seed) == (300, 80, 7, 512, 1, 5)


def test_launcher_arguments_and_the_multi_node_rendezvous(tmp_path):
    from tools.launch import build_parser, torchrun_argv

    done = make("pretrain", "NGPU=0")  # refused before torch is imported
    assert_one_line(done.returncode, done.stderr, "argument --nproc: expected a positive integer, got '0'")
    one = build_parser().parse_args(["--nproc", "2", "train.pretrain", "--config", "c.yaml", "a=1"])
    assert torchrun_argv(one) == [
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "train.pretrain",
        "--config",
        "c.yaml",
        "a=1",
    ]
    many = build_parser().parse_args(
        ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29600", "m"]
    )
    assert torchrun_argv(many)[:4] == ["--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29600"]


def test_bench_quality_text_tower_errors_are_one_line(tmp_path):
    """The README's `make bench-quality TEXT_TOWER=...`: a tower directory without a config.json is
    one line naming it, before any corpus is built (nothing written under OUT)."""
    out = tmp_path / "bq"
    done = make("bench-quality", "SCALE=smoke", f"OUT={out}", f"TEXT_TOWER={tmp_path / 'no_such_model'}")
    assert_one_line(done.returncode, done.stderr, "text_tower=", "no_such_model", "no config.json")
    assert not out.exists()


def test_bench_detection_errors_are_one_line(tmp_path):
    """`make bench-detection CKPT=...` (README): a checkpoint that does not exist is one line naming
    it, before any data is generated; --epochs 0 is one line too."""
    done = make("bench-detection", f"CKPT={tmp_path / 'missing.pt'}", f"DATA={tmp_path / 'data'}")
    assert_one_line(done.returncode, done.stderr, "missing.pt")
    assert not (tmp_path / "data").exists()
    done = make("bench-detection", f"CKPT={tmp_path / 'missing.pt'}", "ARGS=--epochs 0")
    assert_one_line(done.returncode, done.stderr, "--epochs 0")


def test_new_range_and_variant_errors_are_one_line_through_make(tmp_path):
    """`make eval ARGS=data.valid_max_images=-1` names that key (not the pipeline's data.max_samples)
    before any data is rendered; `make bench-quality ARGS=segmentation_variants=[...]` with a variant
    that does not exist, or without the one Table 5a's SIIM column reads, is one line before any stage."""
    data, out = tmp_path / "data", tmp_path / "bq"
    done = in_parallel(
        {
            "eval": ("eval", "TASK=siim_segmentation", "CKPT=random", f"DATA={data}", "ARGS=data.valid_max_images=-1"),
            "unknown": ("bench-quality", "SCALE=smoke", f"OUT={out}", "ARGS=segmentation_variants=[decoder]"),
            "table5a": ("bench-quality", "SCALE=smoke", f"OUT={out}", "ARGS=segmentation_variants=[encoder]"),
        }
    )
    assert_one_line(done["eval"].returncode, done["eval"].stderr, "data.valid_max_images=-1 must be >= 0")
    assert_one_line(done["unknown"].returncode, done["unknown"].stderr, "segmentation_variants ['decoder']")
    assert_one_line(done["table5a"].returncode, done["table5a"].stderr, "names a variant the trained arms do not run")
    assert not data.exists() and not out.exists()
