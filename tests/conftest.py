"""Session fixtures shared across test files: a small synthetic MIMIC corpus packed into shards,
and a tiny local BERT trained on its reports (Bio_ClinicalBERT cannot be downloaded here)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mimic_shards(tmp_path_factory) -> Path:
    from shards.mimic import PackOptions, pack_mimic
    from shards.synthetic.mimic import generate_mimic

    root = tmp_path_factory.mktemp("mimic")
    generate_mimic(root / "corpus", n=60, seed=3, size=256, workers=2)
    options = PackOptions(max_side=96, samples_per_shard=16, workers=2, seed=0)
    pack_mimic(root / "corpus", root / "shards", options, progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, mimic_shards) -> Path:
    from model.text import build_tiny_text_model
    from pipeline.reports import shard_texts

    return build_tiny_text_model(
        tmp_path_factory.mktemp("bert") / "tiny_bert",
        shard_texts(mimic_shards),
        hidden=32,
        layers=2,
        heads=2,
        vocab_size=600,
    )
