"""Reliability of the training half (issue #11): checkpoint pruning and run ownership, stopping a run
(SIGTERM/SIGINT, a dead torchrun launcher), and one-line `error: ...` exits for every user error of
the training entry points. Each case is a row of docs/reliability.md's training table."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.cli import UserError, run_main
from common.config import ConfigError
from common.dist import DistInfo
from common.run_layout import checkpoint_path, list_checkpoints
from tests.pipeline_fixtures import ROOT, child_env
from train import checkpoint as ckpt_mod
from train.checkpoint import (
    CheckpointError,
    RunDirLock,
    claim_checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
)
from train.config import load_pretrain_config

PY = sys.executable
DEMO = "configs/pretrain/demo.yaml"
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def payload(step: int, run_id: str, **extra) -> dict:
    """A checkpoint with every key train.pretrain writes (tiny tensors: the format, not a model)."""
    return {
        "model": {"w": torch.full((2,), float(step))},
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "step": step,
        "loader": {"epoch": 0},
        "rng": [],
        "config": {"model": {}},
        "run_id": run_id,
        **extra,
    }


def run_overrides(out: Path, shards="unused", bert="unused", **extra) -> list[str]:
    args = {
        "data.shards": shards,
        "model.text_model": bert,
        "train.output_dir": out,
        "data.backend": "torch",
        "data.num_workers": 0,
        "data.image_size": 64,
        "model.image_size": 64,
        "train.batch_size_per_gpu": 4,
        "train.log_every": 1,
        "train.checkpoint_every": 1,
        "train.plot_every": 0,
        "train.val_every": 0,
        "train.val_batches": 1,
        "train.progress": False,
        "optim.schedule": "constant",
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def exit_of(main, argv, capsys) -> tuple[int, str]:
    """Run an entry point through run_main as `python -m` would: (exit status, stderr)."""
    with pytest.raises(SystemExit) as info:
        run_main(main, argv)
    return info.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


# ---- 1. pruning and run ownership -----------------------------------------------------------


def test_prune_keeps_newest_and_spares_other_runs_and_unreadable_files(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    # The bug: an earlier run's step_00000100.pt sorted after this run's checkpoints, so keep_last=1
    # deleted every checkpoint just written. Garbage and another run's file must stay untouched too.
    torch.save(payload(100, "earlier"), ckpts / "step_00000100.pt")
    (ckpts / "step_00000200.pt").write_bytes(b"not a checkpoint")
    for step in (1, 2, 3):
        save_checkpoint(checkpoint_path(tmp_path, step), payload(step, "me"), keep_last=1)
        assert checkpoint_path(tmp_path, step).is_file(), f"step {step}: the newest checkpoint was pruned"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000003.pt", "step_00000100.pt", "step_00000200.pt"]
    save_checkpoint(checkpoint_path(tmp_path, 4), payload(4, "me"), keep_last=2)
    # Every file was read once already: later saves prune from the cache, not by reloading files.
    reads = []
    monkeypatch.setattr(ckpt_mod, "_read", lambda *a, **k: reads.append(a) or pytest.fail("re-read"))
    save_checkpoint(checkpoint_path(tmp_path, 5), payload(5, "me"), keep_last=2)
    assert [p.name for p in list_checkpoints(ckpts)][:2] == ["step_00000004.pt", "step_00000005.pt"]
    assert reads == []


def test_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save(payload(7, "earlier"), checkpoint_path(out, 7))
    (out / "checkpoints" / "step_00000009.pt").write_bytes(b"\0" * 10)  # unreadable: not counted
    with pytest.raises(CheckpointError, match=r"1 checkpoint\(s\) of another run \(step_00000007.pt"):
        claim_checkpoint_dir(out / "checkpoints", "fresh")
    claim_checkpoint_dir(out / "checkpoints", "earlier", 7)  # its own run, resumed from its newest: fine
    # Its own run resumed from an earlier step: a later kill would resume the abandoned step 7.
    with pytest.raises(CheckpointError, match=r"this run's checkpoints after step 5 \(step_00000007.pt\)"):
        claim_checkpoint_dir(out / "checkpoints", "earlier", 5)
    import train.pretrain as pretrain

    cfg = load_pretrain_config(DEMO, run_overrides(out, **{"train.resume": "none"}))
    with pytest.raises(CheckpointError, match="another run.*train.resume=auto"):
        pretrain.train(cfg, CPU)  # refused before any model or data is built


def test_run_lock_removes_stale_temp_files_and_refuses_a_second_trainer(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".step_00000004.pt.k2j3.tmp", tmp_path / ".config.yaml.x1.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    keep = tmp_path / "checkpoints" / "step_00000004.pt"
    keep.write_bytes(b"x")
    lock = RunDirLock(tmp_path)
    try:
        assert sorted(lock.stale) == sorted(stale) and not any(p.exists() for p in stale) and keep.exists()
        with pytest.raises(CheckpointError, match=f"in use by another training run \\(pid {os.getpid()}\\)"):
            RunDirLock(tmp_path)
    finally:
        lock.release()
    RunDirLock(tmp_path).release()  # released: the next run gets it


# ---- 2. stopping a run --------------------------------------------------------------------------


def start_pretrain(out: Path, shards, bert, torchrun: bool) -> subprocess.Popen:
    cmd = [str(Path(PY).parent / "torchrun"), "--nproc_per_node=1", "--master_port=29571"] if torchrun else [PY]
    args = run_overrides(out, shards, bert, **{"train.max_steps": 100000})
    return subprocess.Popen(
        cmd + ["-m", "train.pretrain", "--config", DEMO, *args],
        cwd=ROOT,
        env=child_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoints(proc: subprocess.Popen, out: Path, n: int = 2) -> None:
    deadline = time.time() + 120
    while len(list_checkpoints(out / "checkpoints")) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)


def assert_no_partial_files(out: Path) -> None:
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    for path in list_checkpoints(out / "checkpoints"):
        load_checkpoint(path)  # every file left is a whole checkpoint


def test_sigterm_stops_cleanly(mimic_shards, tiny_bert, tmp_path):
    """`kill` during a run that checkpoints every step: exit status 143, one line, no partial file.
    (Ctrl-C is Python's KeyboardInterrupt, the same unwind: see the interrupted-write test below.)"""
    sig, status = signal.SIGTERM, 143
    out = tmp_path / "run"
    proc = start_pretrain(out, mimic_shards, tiny_bert, torchrun=False)
    try:
        wait_for_checkpoints(proc, out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err[-3000:]
    assert_no_partial_files(out)


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_worker_exits_when_torchrun_is_killed(mimic_shards, tiny_bert, tmp_path):
    out = tmp_path / "run"
    launcher = start_pretrain(out, mimic_shards, tiny_bert, torchrun=True)
    workers: list[int] = []
    try:
        wait_for_checkpoints(launcher, out)
        workers = children_of(launcher.pid)
        assert workers, "torchrun has no worker process"
        launcher.send_signal(signal.SIGKILL)  # what `kill -9` on `make pretrain` does
        _, err = launcher.communicate(timeout=60)  # returns once the worker, too, closed the pipe
        assert f"the launcher (pid {launcher.pid}) is gone; stopping this worker" in err, err[-3000:]
        deadline = time.time() + 30
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), "the worker kept running after its launcher died"
        count = len(list_checkpoints(out / "checkpoints"))
        time.sleep(1.0)
        assert len(list_checkpoints(out / "checkpoints")) == count  # nobody writes any more
        assert_no_partial_files(out)
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
        launcher.kill()


def test_interrupted_checkpoint_write_leaves_nothing_partial(tmp_path, monkeypatch):
    """A signal or a full disk in the middle of torch.save: no temp file, older checkpoints intact."""
    save_checkpoint(checkpoint_path(tmp_path, 1), payload(1, "me"), keep_last=1)
    real_save = torch.save

    def dies_halfway(obj, fh, exc):
        real_save(obj, fh)
        fh.truncate(fh.tell() // 2)
        raise exc

    for exc, expect in (
        (SystemExit(143), SystemExit),
        (KeyboardInterrupt(), KeyboardInterrupt),
        (OSError(errno.ENOSPC, "No space left on device"), CheckpointError),
    ):
        monkeypatch.setattr(ckpt_mod.torch, "save", lambda obj, fh, e=exc: dies_halfway(obj, fh, e))
        with pytest.raises(expect) as info:
            save_checkpoint(checkpoint_path(tmp_path, 2), payload(2, "me"), keep_last=1)
        if expect is CheckpointError:
            assert "No space left on device" in str(info.value) and "step_00000002.pt" in str(info.value)
        assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001.pt"]
        assert load_checkpoint(checkpoint_path(tmp_path, 1))["step"] == 1


# ---- 3. one-line errors from the entry points ----------------------------------------------------


@pytest.fixture
def pretrain_main():
    import train.pretrain as pretrain

    return pretrain.main


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--config", DEMO, "train.max_stepz=3"], ["unknown key", "max_stepz"]),
        (["--config", DEMO, "train.epochs=two"], ["train.epochs", "expected an int"]),
        (["--config", DEMO, "train.epochs"], ["train.epochs", "key.sub=value"]),
        (["--config", DEMO, "optim.betas=[0.9"], ["optim.betas", "not valid YAML"]),
        (["--config", DEMO, "train=5"], ["train", "expected a mapping"]),
        (["--config", DEMO, "model=5"], ["model", "expected a mapping"]),
        (["--config", "configs/pretrain/nope.yaml"], ["config file not found", "nope.yaml"]),
        (["--config", DEMO, "optim.lr=.nan"], ["optim.lr", "finite"]),
        (["--config", DEMO, "model.name=g2d_huge"], ["model.name", "g2d_tiny"]),
        (
            ["--config", DEMO, "train.output_dir=!!python/object/apply:os.system [touch pwned]"],
            ["train.output_dir", "not valid YAML", "python/object"],
        ),
    ],
)
def test_pretrain_config_errors_are_one_line(argv, needles, pretrain_main, capsys):
    code, err = exit_of(pretrain_main, argv, capsys)
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize(
    "text,needles",
    [
        ("train:\n  epochs: [1\n", ["bad.yaml", "line 3"]),
        ("train: !!python/object/apply:os.system ['touch pwned']\n", ["bad.yaml", "line 1", "python/object"]),
        ("", ["bad.yaml is empty"]),
        ("- 1\n- 2\n", ["bad.yaml", "top level must be a mapping"]),
        ("defaults: [base.yaml]\ntrain:\n  epochs: 1\n", ["defaults"]),
    ],
)
def test_pretrain_yaml_errors_name_file_and_line(text, needles, pretrain_main, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = exit_of(pretrain_main, ["--config", str(write(tmp_path / "bad.yaml", text))], capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "pwned").exists()


class Pwn:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "kind,needles",
    [
        ("missing", ["checkpoint not found"]),
        ("truncated", ["truncated, damaged or not a torch checkpoint"]),
        ("foreign", ["is not a pretraining checkpoint", "optimizer"]),
        ("malicious", ["refused to load"]),
        ("text", ["truncated, damaged or not a torch checkpoint"]),
        ("directory", ["is a directory"]),
        ("other_model", ["different model config", "image_size"]),
        ("bad_step", ["is not a pretraining checkpoint", "step 'five'"]),
    ],
)
def test_bad_resume_checkpoint_is_one_line(kind, needles, pretrain_main, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ckpt.pt"
    if kind == "truncated":
        torch.save(payload(5, "x"), path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "foreign":
        torch.save({"conv1.weight": torch.zeros(1)}, path)  # what g2d_encoder.pth looks like
    elif kind == "malicious":
        torch.save({"model": Pwn()}, path)
    elif kind == "text":
        path.write_text("step: 5\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "bad_step":
        torch.save({**payload(5, "x"), "step": "five"}, path)
    elif kind == "other_model":
        torch.save(payload(5, "x", config={"model": {"name": "g2d_tiny", "image_size": 96}}), path)
    args = run_overrides(tmp_path / "run", **{"train.resume": path})
    code, err = exit_of(pretrain_main, ["--config", str(ROOT / DEMO), *args], capsys)
    assert_one_line_error(code, err, str(path), *needles)
    assert not (tmp_path / "pwned").exists()


def test_missing_text_model_is_immediate(pretrain_main, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name, needles, limit in (
        ("runs/tiny_bert", ["runs/tiny_bert", "make tiny-bert"], 5.0),
        (str(tmp_path / "nope"), ["does not exist", "make tiny-bert"], 5.0),
        # no network here: one attempt, not huggingface_hub's ~45 s of retries
        ("no-such-org/no-such-bert", ["no-such-org/no-such-bert", "HF_HUB_OFFLINE=1"], 20.0),
    ):
        t0 = time.perf_counter()
        code, err = exit_of(
            pretrain_main, ["--config", str(ROOT / DEMO), *run_overrides(tmp_path / "run", bert=name)], capsys
        )
        assert time.perf_counter() - t0 < limit, name
        assert_one_line_error(code, err, *needles)


def test_output_dir_problems(pretrain_main, capsys, tmp_path, monkeypatch):
    afile = write(tmp_path / "afile", "x")
    code, err = exit_of(pretrain_main, ["--config", DEMO, f"train.output_dir={afile}"], capsys)
    assert_one_line_error(code, err, "train.output_dir", str(afile), "not a directory")
    (tmp_path / "run").mkdir()
    write(tmp_path / "run" / "checkpoints", "x")  # a file where the checkpoint folder goes
    code, err = exit_of(pretrain_main, ["--config", DEMO, f"train.output_dir={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, err, str(tmp_path / "run" / "checkpoints"), "not a directory")
    # Read-only: simulated (the tests may run as root, which ignores permission bits).
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, err = exit_of(pretrain_main, ["--config", DEMO, f"train.output_dir={tmp_path / 'ro' / 'run'}"], capsys)
    assert_one_line_error(code, err, "Permission denied", str(tmp_path / "ro"))


def test_debug_shows_the_traceback(pretrain_main, capsys):
    with pytest.raises(ConfigError, match="max_stepz"):
        run_main(pretrain_main, ["--config", DEMO, "train.max_stepz=3", "--debug"])


def test_tool_entry_points_are_one_line(capsys, tmp_path):
    from tools import demo, make_tiny_bert

    code, err = exit_of(demo.main, ["optim.lr=-1"], capsys)
    assert_one_line_error(code, err, "optim.lr=-1.0 must be > 0")
    empty = tmp_path / "shards"
    empty.mkdir()
    (empty / "manifest.json").write_text('{"format": "nope"}')
    code, err = exit_of(make_tiny_bert.main, ["--shards", str(empty), "--out", str(tmp_path / "b")], capsys)
    assert_one_line_error(code, err, "manifest.json")
    entry_points = ["tools/demo.py", "tools/make_tiny_bert.py"]
    entry_points += [f"bench/{name}.py" for name in ("train", "pipeline", "shards", "profile_dali")]
    for path in entry_points:
        tail = (ROOT / path).read_text().rstrip().splitlines()[-1]
        assert tail.strip() == "run_main(main)", path


# ---- 4. step settings and other numeric domains ------------------------------------------------


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.checkpoint_every=0", "train.checkpoint_every=0 must be >= 1"),
        ("train.log_every=0", "train.log_every=0 must be >= 1"),
        ("train.plot_every=-1", "train.plot_every=-1 must be >= 0"),
        ("train.epochs=0", "train.epochs=0 must be >= 1"),
        ("train.max_steps=-5", "train.max_steps=-5 must be >= 0"),
        ("train.keep_last=0", "train.keep_last=0 must be >= 1"),
        ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu=0 must be >= 1"),
        ("optim.lr=0", "optim.lr=0.0 must be > 0"),
        ("optim.name=sgd", "optim.name='sgd' must be one of ('adamw', 'apex_fused_adam', 'apex_fused_lamb')"),
        ("optim.schedule=linear", "optim.schedule='linear' must be one of ('warmup_cosine', 'cosine_restarts',"),
        ("optim.lr=.inf", "optim.lr=inf must be a finite number"),
        ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
        ("optim.betas=[0.9,1.5]", "optim.betas=(0.9, 1.5) must be two values in [0, 1)"),
        ("model.image_size=100", "model.image_size=100 must be a positive multiple of 32"),
        ("model.temperature=0", "model.temperature=0.0 must be > 0"),
        ("model.pseudo_mask_quantile=1", "model.pseudo_mask_quantile=1.0 must be in (0, 1)"),
    ],
)
def test_numeric_domains_checked_at_load(override, needle):
    with pytest.raises(ConfigError) as info:
        load_pretrain_config(DEMO, [override])
    assert str(info.value).startswith(needle), str(info.value)
    assert isinstance(info.value, UserError)


# ---- 5. more of what a tired user or an attacker tries ------------------------------------------


def test_cut_off_metrics_line_does_not_block_resume(tmp_path, capsys):
    from train.pretrain import MetricsLog

    path = write(
        tmp_path / "metrics.jsonl",
        '{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.9}\n{"step": 3, "loss": 1.8}\n{"step": 4, "lo',
    )  # killed mid-append
    MetricsLog(path, resume_step=2, enabled=True, tensorboard=False)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'
    assert "dropping a cut-off line" in capsys.readouterr().err  # a logging WARNING (stderr)


def test_full_disk_or_read_only_filesystem_is_one_line(pretrain_main, capsys, tmp_path, monkeypatch):
    import train.pretrain as pretrain

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(pretrain, "save_config", full)
    code, err = exit_of(pretrain_main, ["--config", DEMO, f"train.output_dir={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, err, "No space left on device", "config.yaml")


@pytest.mark.parametrize(
    "extra,needles",
    [
        ({"data.shards": "/nonexistent/shards"}, ["/nonexistent/shards", "manifest"]),
        ({"train.global_batch_size": 6}, ["train.global_batch_size=6 is not a multiple"]),
        ({"train.output_dir": " "}, ["train.output_dir is empty"]),
    ],
)
def test_run_setup_errors_are_one_line(extra, needles, mimic_shards, tiny_bert, pretrain_main, capsys, tmp_path):
    args = run_overrides(tmp_path / "run", mimic_shards, tiny_bert, **extra)
    code, err = exit_of(pretrain_main, ["--config", DEMO, *args], capsys)
    assert_one_line_error(code, err, *needles)


def test_config_path_is_a_directory(pretrain_main, capsys):
    code, err = exit_of(pretrain_main, ["--config", "configs/pretrain"], capsys)
    assert_one_line_error(code, err, "is a directory", "configs/pretrain")


def test_checkpoint_that_does_not_fit_the_model_is_one_line(mimic_shards, tiny_bert, pretrain_main, capsys, tmp_path):
    """Right keys and the same model config, but edited weights: named, not a load_state_dict traceback."""
    cfg = load_pretrain_config(DEMO, run_overrides(tmp_path / "run", mimic_shards, tiny_bert))
    from common.config import config_to_dict

    path = tmp_path / "edited.pt"
    torch.save(payload(5, "x", config=config_to_dict(cfg)), path)
    args = run_overrides(tmp_path / "run", mimic_shards, tiny_bert, **{"train.resume": path})
    code, err = exit_of(pretrain_main, ["--config", DEMO, *args], capsys)
    # The one line names the keys (model.image.load_strict), not torch's multi-line report's first line.
    assert_one_line_error(code, err, f"could not restore the run from {path}", "unexpected ['w']", "missing ['image.")


def test_tilde_in_output_dir_means_home(pretrain_main, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, err = exit_of(
        pretrain_main,
        ["--config", str(ROOT / DEMO), *run_overrides(Path("~/run"), bert=str(tmp_path / "nope"))],
        capsys,
    )
    assert_one_line_error(code, err, "nope")  # stops at the missing text model, after creating the run
    assert (tmp_path / "home" / "run" / "config.yaml").is_file() and not (tmp_path / "~").exists()


# ---- reusable artefacts: the tiny BERT records the reports it was built from (issue #29) ------


class _StopBeforeTraining(Exception):
    pass


def test_demo_reuses_the_tiny_bert_only_when_built_from_the_same_reports(tmp_path, monkeypatch, capsys):
    from pipeline.reports import shard_texts
    from tests.pipeline_fixtures import pack_tiny
    from tools import demo, make_tiny_bert, pack_shards, verify_shards

    shards = {name: tmp_path / name for name in ("a", "b")}
    for seed, root in enumerate(shards.values()):
        pack_tiny(root, n_train=20, n_valid=4, per_shard=10, seed=seed)
    bert, run = tmp_path / "bert", tmp_path / "run"
    # Stages 1-2 (render + pack the demo corpus) are not what this is about; stage 4 stops the demo.
    monkeypatch.setattr(demo, "ensure_synthetic", lambda *a, **k: tmp_path / "corpus")
    monkeypatch.setattr(pack_shards, "pack", lambda *a, **k: None)
    monkeypatch.setattr(verify_shards, "verify", lambda *a, **k: 0)

    def stop(cfg, dist):
        raise _StopBeforeTraining(cfg.model.text_model)

    monkeypatch.setattr(demo, "train", stop)
    monkeypatch.chdir(ROOT)

    def demo_on(name: str) -> str:
        with pytest.raises(_StopBeforeTraining):
            demo.main([f"data.shards={shards[name]}", f"model.text_model={bert}", f"train.output_dir={run}"])
        return capsys.readouterr().out

    def fingerprint(name: str) -> str:
        return make_tiny_bert.reports_fingerprint(shard_texts(shards[name]))

    assert "tiny BERT" in demo_on("a")
    assert make_tiny_bert.recorded_fingerprint(bert)["reports_sha256"] == fingerprint("a")
    built = (bert / "config.json").stat().st_mtime_ns
    assert f"using {bert}" in demo_on("a")
    assert (bert / "config.json").stat().st_mtime_ns == built  # reused, not rebuilt
    # Built from other shards (`make tiny-bert SHARDS_DIR=<other>`): rebuilt, and the output says why.
    out = demo_on("b")
    assert f"rebuilding {bert}: it was built from other reports" in out and str(shards["a"]) in out
    assert make_tiny_bert.recorded_fingerprint(bert)["reports_sha256"] == fingerprint("b")
    # A pretraining run made with the previous BERT is not continued with the rebuilt one.
    (run / "checkpoints").mkdir(parents=True)
    torch.save({}, checkpoint_path(run, 1))
    code, err = exit_of(
        demo.main, [f"data.shards={shards['a']}", f"model.text_model={bert}", f"train.output_dir={run}"], capsys
    )
    assert_one_line_error(code, err, str(run), "previous", str(bert))
    # A text model with no record (an older tiny BERT, or a real model put there) is never overwritten.
    (bert / make_tiny_bert.FINGERPRINT_FILE).unlink()
    before = (bert / "config.json").read_bytes()
    code, err = exit_of(
        demo.main, [f"data.shards={shards['b']}", f"model.text_model={bert}", f"train.output_dir={run}"], capsys
    )
    assert_one_line_error(code, err, str(bert), "no record of the reports", "tools.make_tiny_bert")
    assert (bert / "config.json").read_bytes() == before
