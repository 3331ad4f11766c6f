"""`make compare` refuses what it cannot pair: runs scored on different test sets (keys, labels,
patients, lengths) and damaged run files (results.json, predictions.npz) are one line `error: ...`
with exit status 2 naming the first difference or the file; two runs on the same test set compare.

The run directories are written here as evaluations write them (eval.runner.save_predictions and a
results.json), so each case costs milliseconds."""

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.cli import run_main
from eval.runner import BadPredictions, load_predictions, save_predictions
from tests.pipeline_fixtures import MAKE_ERROR_LINE, shell_env
from tools.compare import main as compare_main
from tools.eval import EVAL_USER_ERRORS

ROOT = Path(__file__).resolve().parent.parent
N = 8


def classification(seed: int = 0, n: int = N) -> dict:
    rng = np.random.default_rng(seed)
    targets = np.array([[i % 2] for i in range(n)])
    return {
        "keys": np.array([f"k{i}" for i in range(n)]),
        "patient_ids": np.array([f"p{i // 2}" for i in range(n)]),
        "kind": np.asarray("binary"),
        "names": np.array(["Pneumonia"]),
        "targets": targets,
        "scores": rng.random((n, 1)) + 0.5 * targets,
    }


def write_run(root: Path, predictions: dict, task: str = "rsna_linear", image_size: int = 224) -> Path:
    root.mkdir(parents=True)
    (root / "results.json").write_text(
        json.dumps({"task": task, "bootstrap": {"unit": "patient"}, "config": {"data": {"image_size": image_size}}})
    )
    save_predictions(root / "predictions.npz", predictions)
    return root


def compare(a: Path, b: Path, tmp_path: Path, task: str = "rsna_linear") -> int:
    argv = ["--a", str(a), "--b", str(b), "--task", task, "--out", str(tmp_path / "cmp")]
    with pytest.raises(SystemExit) as done:
        run_main(compare_main, argv, extra_errors=EVAL_USER_ERRORS)
    return done.value.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_same_test_set_compares_even_in_another_order(tmp_path, capsys):
    a = write_run(tmp_path / "a", classification(0))
    order = np.random.default_rng(1).permutation(N)
    shuffled = {k: (v[order] if v.ndim and len(v) == N else v) for k, v in classification(2).items()}
    b = write_run(tmp_path / "b", shuffled)
    assert compare(a, b, tmp_path) == 0
    assert "auroc" in capsys.readouterr().out
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["metrics"]["auroc"]["ci95"] is not None


def test_flipped_labels_are_refused_naming_the_first_key(tmp_path, capsys):
    a = write_run(tmp_path / "a", classification(0))
    flipped = classification(0)
    flipped["targets"] = 1 - flipped["targets"]
    b = write_run(tmp_path / "b", flipped)
    assert compare(a, b, tmp_path) == 2
    line = one_error_line(capsys)
    assert "not scored on the same test set: key 'k0' has targets [0] in A, [1] in B" in line
    assert not (tmp_path / "cmp").exists()


def test_fewer_scores_than_keys_is_refused_before_any_bootstrap(tmp_path, capsys):
    """The issue's case: 6 scores for 8 keys used to report '-62.5 [-100, -20]'."""
    a = write_run(tmp_path / "a", classification(0))
    short = classification(0)
    short["scores"] = short["scores"][:6]
    b = write_run(tmp_path / "b", short)
    assert compare(a, b, tmp_path) == 2
    assert one_error_line(capsys).endswith(f"{b / 'predictions.npz'}: scores has 6 rows for 8 keys")


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda p: {k: v[:6] if v.ndim and len(v) == N else v for k, v in p.items()}, "A scored 8 test images, B 6"),
        (lambda p: {**p, "keys": np.array([f"k{i}" for i in range(N - 1)] + ["other"])}, "key 'k7' is in A but not"),
        (lambda p: {**p, "patient_ids": np.array([f"q{i}" for i in range(N)])}, "key 'k0' has patient_ids"),
        (lambda p: {**p, "names": np.array(["Effusion"])}, "label names differ"),
        (lambda p: {**p, "keys": np.array(["k0"] * N)}, "key 'k0' appears more than once"),
        (lambda p: {k: v for k, v in p.items() if k != "targets"}, "lacks the array(s) ['targets']"),
        (lambda p: {**p, "scores": np.full((N, 1), "x")}, "scores is not numeric"),
    ],
)
def test_other_differences_name_the_first_one(change, expected, tmp_path, capsys):
    a = write_run(tmp_path / "a", classification(0))
    b = write_run(tmp_path / "b", change(classification(0)))
    assert compare(a, b, tmp_path) == 2
    assert expected in one_error_line(capsys)


def detection(boxes_of_k1: list) -> dict:
    return {
        "keys": np.array(["k0", "k1"]),
        "patient_ids": np.array(["", ""]),
        "pred_boxes": np.array([[0, 0, 10, 10]], dtype=float),
        "pred_scores": np.array([0.9]),
        "pred_image": np.array([0]),
        "gt_boxes": np.array([[0, 0, 8, 8], *boxes_of_k1], dtype=float).reshape(-1, 4),
        "gt_image": np.array([0] + [1] * len(boxes_of_k1)),
        "iou_thresholds": np.array([0.5]),
    }


def test_detection_ground_truth_boxes_must_match(tmp_path, capsys):
    a = write_run(tmp_path / "a", detection([[1, 1, 5, 5]]), task="rsna_detection")
    b = write_run(tmp_path / "b", detection([]), task="rsna_detection")
    assert compare(a, b, tmp_path, "rsna_detection") == 2
    assert "key 'k1' has 1 ground-truth boxes in A, 0 in B" in one_error_line(capsys)
    moved = write_run(tmp_path / "m", detection([[2, 2, 6, 6]]), task="rsna_detection")
    assert compare(a, moved, tmp_path, "rsna_detection") == 2
    assert "key 'k1' has ground-truth boxes [[1.0, 1.0, 5.0, 5.0]] in A" in one_error_line(capsys)
    # Another image size: boxes are in other pixels, only their count is a label.
    resized = write_run(tmp_path / "r", detection([[2, 2, 6, 6]]), task="rsna_detection", image_size=256)
    assert compare(a, resized, tmp_path, "rsna_detection") == 0
    bad_index = {**detection([[1, 1, 5, 5]]), "pred_image": np.array([5])}
    b2 = write_run(tmp_path / "b2", bad_index, task="rsna_detection")
    capsys.readouterr()
    assert compare(a, b2, tmp_path, "rsna_detection") == 2
    assert "pred_image names images outside 0..1" in one_error_line(capsys)


def test_segmentation_positivity_must_match(tmp_path, capsys):
    def seg(positive):
        return {
            "keys": np.array(["k0", "k1"]),
            "dice": np.array([1.0, 0.5]),
            "iou": np.array([1.0, 0.3]),
            "positive": np.array(positive),
        }

    a = write_run(tmp_path / "a", seg([False, True]), task="siim_segmentation")
    b = write_run(tmp_path / "b", seg([True, True]), task="siim_segmentation")
    assert compare(a, b, tmp_path, "siim_segmentation") == 2
    assert "key 'k0' has positive False in A, True in B" in one_error_line(capsys)


def test_damaged_run_files_are_one_line_errors(tmp_path, capsys):
    good = write_run(tmp_path / "good", classification(0))

    broken_json = write_run(tmp_path / "json", classification(0))
    (broken_json / "results.json").write_text('{"task": "rsna_linear", ')
    assert compare(good, broken_json, tmp_path) == 2
    line = one_error_line(capsys)
    assert f"{broken_json / 'results.json'}: not valid JSON" in line

    not_object = write_run(tmp_path / "list", classification(0))
    (not_object / "results.json").write_text("[1, 2]")
    assert compare(good, not_object, tmp_path) == 2
    assert "not a JSON object (a list)" in one_error_line(capsys)

    truncated = write_run(tmp_path / "trunc", classification(0))
    npz = truncated / "predictions.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    assert compare(good, truncated, tmp_path) == 2
    assert f"{npz}: not a readable predictions archive (BadZipFile" in one_error_line(capsys)

    # An object array would need unpickling: refused, never loaded (allow_pickle=False).
    pickled = write_run(tmp_path / "obj", classification(0))
    np.savez(pickled / "predictions.npz", **{**classification(0), "scores": np.array([object()] * N, dtype=object)})
    assert compare(good, pickled, tmp_path) == 2
    assert "Object arrays cannot be loaded when allow_pickle=False" in one_error_line(capsys)

    # One member's bytes flipped inside the archive: zip's CRC check names it.
    flipped = write_run(tmp_path / "crc", classification(0))
    npz = flipped / "predictions.npz"
    with zipfile.ZipFile(npz) as zf:
        info = zf.getinfo("scores.npy")
    raw = bytearray(npz.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    raw[start] ^= 0xFF
    npz.write_bytes(bytes(raw))
    assert compare(good, flipped, tmp_path) == 2
    assert f"{npz}: not a readable predictions archive" in one_error_line(capsys)


def test_odd_results_fields_do_not_break_the_comparison(tmp_path, capsys):
    """results.json fields compare reads only for display (config, bootstrap) may be absent or odd."""
    a = write_run(tmp_path / "a", classification(0))
    b = write_run(tmp_path / "b", classification(1))
    (b / "results.json").write_text(json.dumps({"task": "rsna_linear", "config": 5, "bootstrap": []}))
    assert compare(a, b, tmp_path) == 0
    assert "resamples of patients" in capsys.readouterr().out


def test_load_predictions_refuses_a_bare_npy(tmp_path):
    path = tmp_path / "predictions.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(BadPredictions, match="not an .npz archive"):
        load_predictions(path)


def test_make_compare_prints_one_line_for_flipped_labels(tmp_path):
    """Through the command the README shows: make's own 'Error 2' line may follow, nothing else."""
    if not list((ROOT / ".venv").glob(".setup-*")):
        pytest.skip("make setup has not run here (make compare would install the venv first)")
    a = write_run(tmp_path / "a", classification(0))
    flipped = classification(0)
    flipped["targets"] = 1 - flipped["targets"]
    b = write_run(tmp_path / "b", flipped)
    done = subprocess.run(
        ["make", "--no-print-directory", "compare", f"A={a}", f"B={b}", "TASK=rsna_linear"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=shell_env(G2D_DEBUG=""),
    )
    lines = [line for line in done.stderr.splitlines() if not MAKE_ERROR_LINE.match(line)]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: A (") and "key 'k0' has targets [0] in A, [1] in B" in lines[0]
