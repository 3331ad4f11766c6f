"""Tools are thin wiring over library functions: the demo and the benchmarks (bench/, run by the
Makefile as `python -m bench.<name>`) call the same typed functions the CLIs parse their argv into
(shards.ensure, pack_shards.pack, verify_shards.verify, make_tiny_bert.build), and no tool drives
another through its argv."""

import re
from pathlib import Path

import pytest

from common.cli import UserError
from shards.ensure import ensure_data, ensure_synthetic
from shards.mimic import SYNTHETIC_SAMPLES_PER_SHARD, PackOptions
from tools import make_tiny_bert, pack_shards, verify_shards

ROOT = Path(__file__).resolve().parents[1]


def test_no_tool_calls_another_through_argv():
    calls = []
    for package in ("tools", "bench", "eval", "train"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"\b\w+\.main\(\[", line):
                    calls.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not calls, calls


def test_ensure_synthetic_rejects_empty_sizes_and_keeps_an_existing_corpus(tmp_path, capsys):
    with pytest.raises(UserError, match="both must be >= 1"):
        ensure_synthetic(tmp_path / "c", 0, 64, 0, 1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "stray.txt").write_text("not a corpus")
    with pytest.raises(UserError):  # a non-empty folder that is not a corpus is never replaced
        ensure_synthetic(corpus, 2, 64, 0, 1)


def test_ensure_data_names_the_missing_dataset_under_a_user_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no packed shards for \['covidx'\]"):
        ensure_data(str(tmp_path / "mine"), ["covidx"], log=lambda *_: None)


def test_library_functions_pack_verify_and_build_the_tiny_bert(tmp_path, capsys):
    corpus = ensure_synthetic(tmp_path / "corpus", 12, 64, 0, 1)
    out = tmp_path / "shards"
    options = PackOptions(max_side=64, quality=90, samples_per_shard=SYNTHETIC_SAMPLES_PER_SHARD, workers=1, seed=0)
    manifest = pack_shards.pack(corpus, out, options)
    assert manifest["num_samples"] > 0
    assert f"pack_shards: {manifest['num_samples']} samples in {out}" in capsys.readouterr().out
    assert verify_shards.verify(out, 1) == 0
    assert "verify_shards: OK" in capsys.readouterr().out
    with pytest.raises(UserError, match="no packed dataset"):
        verify_shards.verify(tmp_path / "nowhere", 1)
    saved = make_tiny_bert.build(out, tmp_path / "bert", hidden=16, layers=1, vocab_size=200)
    assert (saved / "config.json").is_file()
