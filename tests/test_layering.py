"""Dependencies point one way: model -> (torch, common); pipeline -> (shards, common), never model;
eval -> (model, pipeline, shards, common), never train; shards -> common. The lab (bench/: benchmarks
and the quality harness) may import everything; no product package imports it, and neither do the
entry points in tools/ (the Makefile runs `python -m bench.<name>`), so tools <-> bench is no circle.
Checked on the import statements of every module, so a violation fails here rather than in review."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("common", "shards", "pipeline", "model", "train", "eval")
LAB = "bench"
PROJECT = {*PRODUCT, LAB, "tools"}
ALLOWED = {
    "common": {"common"},
    "shards": {"common", "shards"},
    "pipeline": {"common", "shards", "pipeline"},
    "model": {"common", "model"},
    "eval": {"common", "shards", "pipeline", "model", "eval"},
    "train": {"common", "shards", "pipeline", "model", "eval", "train"},
    LAB: PROJECT,
    "tools": PROJECT - {LAB},
}
# Entry points stay thin: a tool that grows past this has library code that belongs in a package.
TOOL_MAX_LINES = 200


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def test_dependencies_point_one_way():
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = imported_packages(path) - allowed
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, "\n".join(violations)


def test_no_product_package_imports_the_lab():
    importers = [
        str(path.relative_to(ROOT))
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
        if LAB in imported_packages(path)
    ]
    assert not importers, f"product code imports the lab package {LAB}: {importers}"


def test_tools_do_not_import_the_lab():
    # The lab calls tools' library functions (pack_shards.pack, verify_shards.verify, ...): an import
    # back from tools would make a circle; bench modules are their own entry points.
    tools = sorted((ROOT / "tools").rglob("*.py"))
    importers = [str(p.relative_to(ROOT)) for p in tools if LAB in imported_packages(p)]
    assert not importers, f"tools/ imports the lab package {LAB}: {importers}"


def test_tools_are_thin_entry_points():
    long = {}
    for path in sorted((ROOT / "tools").glob("*.py")):
        n_lines = len(path.read_text(encoding="utf-8").splitlines())
        if n_lines > TOOL_MAX_LINES:
            long[path.name] = n_lines
    assert not long, f"tools/ files over {TOOL_MAX_LINES} lines (move the library code out): {long}"


def test_model_does_not_use_distributed_setup():
    # The model may all-gather through common.dist, but never initialises process groups itself.
    for path in (ROOT / "model").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "init_process_group" not in text, path
