"""The converged linear probe (linear.protocol=lbfgs, eval/tasks/linear.py): its logistic regression
against sklearn's as an oracle, a separable problem solved exactly, stratified and reproducible
low-data draws, the penalty chosen on validation, mean/std over draws, and one end-to-end run whose
results.json says which protocol ran. The mgca protocol stays the default."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from eval.runner import load_predictions, run_eval
from eval.tasks import TASKS, load_task_config
from eval.tasks.data import LabelSpec
from eval.tasks.linear import LinearSection, draw_subset, fit_logistic, probe_with_redraws, standardise
from shards.downstream import convert
from shards.synthetic.downstream import write_all


def blobs(n: int, d: int, classes: int, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points in d dims around `classes` random centres `sep` apart (per axis); labels [n]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * sep
    label = torch.arange(n) % classes
    return centres[label] + torch.randn(n, d, generator=g), label


@pytest.mark.parametrize("classes", [2, 3])
def test_fit_matches_sklearn_logistic_regression(classes):
    x, label = blobs(300, 8, classes, sep=0.7, seed=classes)  # overlapping classes: a finite optimum
    x = x.double()  # sklearn fits in the input's precision
    l2 = 0.05
    kind = "binary" if classes == 2 else "multiclass"
    target = label[:, None].double() if kind == "binary" else label
    fitted = fit_logistic(x, target, kind, 1 if kind == "binary" else classes, l2, max_iter=500, tolerance=1e-9)
    assert fitted.converged and fitted.grad_max <= 1e-9 and 0 < fitted.iterations < 500
    # sklearn minimises C * sum(log-loss) + ||w||^2 / 2 (intercept not penalised): C = 1 / (l2 n).
    oracle = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-12, max_iter=10_000).fit(x.numpy(), label.numpy())
    logits = fitted.logits(x)
    if kind == "binary":
        assert np.allclose(fitted.weight[:, 0].numpy(), oracle.coef_[0], atol=1e-5)
        assert np.allclose(fitted.bias.numpy(), oracle.intercept_, atol=1e-5)
        ours = torch.sigmoid(logits)[:, 0].numpy()
        assert np.allclose(ours, oracle.predict_proba(x.numpy())[:, 1], atol=1e-6)
    else:
        assert np.allclose(fitted.weight.T.numpy(), oracle.coef_, atol=1e-5)
        assert np.allclose(logits.softmax(1).numpy(), oracle.predict_proba(x.numpy()), atol=1e-6)


def test_separable_problem_is_solved():
    x, label = blobs(200, 16, 2, sep=4.0, seed=0)
    target = label[:, None].double()
    (xs,) = standardise(x)
    fitted = fit_logistic(xs[:100], target[:100], "binary", 1, 1e-3, max_iter=1000, tolerance=1e-6)
    assert fitted.converged
    spec = LabelSpec("binary", ["finding"])
    scores = spec.scores(fitted.logits(xs[100:])).numpy()
    assert spec.metrics(scores, target[100:].numpy())["auroc"] == 1.0


def test_standardise_uses_the_training_rows_and_centres_a_constant_feature():
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    other = torch.tensor([[3.0, 7.0]])
    s_train, s_other = standardise(train, other)
    assert torch.allclose(s_train[:, 0].mean(), torch.tensor(0.0)) and torch.allclose(
        s_train[:, 0].std(unbiased=False), torch.tensor(1.0)
    )
    assert torch.equal(s_train[:, 1], torch.zeros(3)) and s_other.tolist() == [[0.0, 2.0]]


def test_low_data_draws_are_stratified_reproducible_and_different():
    binary = torch.zeros(200, 1)
    binary[:20] = 1  # 10% positives
    draws = [draw_subset(binary, 20, "binary", torch.Generator().manual_seed(s)) for s in range(5)]
    for idx in draws:
        assert len(idx) == len(set(idx.tolist())) == 20 and binary[idx].sum() == 2  # the share kept
    assert len({tuple(idx.tolist()) for idx in draws}) == 5
    assert torch.equal(draws[0], draw_subset(binary, 20, "binary", torch.Generator().manual_seed(0)))
    # A class too rare for its share still gets one image; sizes stay exact.
    multiclass = torch.tensor([0] * 95 + [1] * 4 + [2])
    idx = draw_subset(multiclass, 10, "multiclass", torch.Generator().manual_seed(1))
    assert len(idx) == 10 and set(multiclass[idx].tolist()) == {0, 1, 2}
    assert torch.equal(draw_subset(multiclass, 100, "multiclass", torch.Generator()), torch.arange(100))
    multilabel = torch.randint(0, 2, (50, 3)).float()
    assert len(set(draw_subset(multilabel, 7, "multilabel", torch.Generator().manual_seed(2)).tolist())) == 7


def test_redraws_pick_the_penalty_on_validation_and_report_mean_and_std():
    x, label = blobs(600, 32, 2, sep=0.35, seed=4)
    y = label[:, None].float()
    spec = LabelSpec("binary", ["finding"])
    lin = LinearSection(protocol="lbfgs", l2_grid=(1e-4, 1e-1, 10.0), redraws=5)
    logs = []
    out = probe_with_redraws(x[:400], y[:400], x[400:500], y[400:500], x[500:], y[500:], spec, lin, 40, 7, logs.append)
    assert out["n_draws"] == 5 and len(out["draws"]) == 5 and out["n_train"] == 40
    test = [d["test"]["auroc"] for d in out["draws"]]
    assert out["auroc_mean"] == pytest.approx(np.mean(test)) and out["auroc_std"] == pytest.approx(np.std(test, ddof=1))
    assert out["auroc_std"] > 0 and 0.5 < out["auroc_mean"] <= 1.0  # five different subsets, one signal
    assert [d["seed"] for d in out["draws"]] == [7, 8, 9, 10, 11]
    for d in out["draws"]:
        assert d["n_train"] == 40 and d["converged"] and all(row["converged"] for row in d["grid"])
        best = max(d["grid"], key=lambda row: (row["val_auroc"], -row["val_loss"]))
        assert d["l2"] == best["l2"] and d["val_auroc"] == best["val_auroc"]
    first = spec.metrics(out["test_scores"], out["test_target"])["auroc"]
    assert first == pytest.approx(out["draws"][0]["test"]["auroc"])  # predictions hold the first draw
    assert any("lbfgs: 5 draw(s) of 40 training images" in line for line in logs)
    # The whole split: one draw, no spread to report.
    whole = probe_with_redraws(x[:400], y[:400], x[400:500], y[400:500], x[500:], y[500:], spec, lin, 400, 7, print)
    assert whole["n_draws"] == 1 and whole["auroc_std"] == 0.0 and whole["draws"][0]["n_train"] == 400


def test_protocol_switch_defaults_to_mgca():
    for name, task in TASKS.items():
        if task.family == "linear":
            assert load_task_config(name).linear.protocol == "mgca", name
    cfg = load_task_config("rsna_linear", "0.01", overrides=["linear.protocol=lbfgs", "linear.l2_grid=[0.1,1.0]"])
    assert cfg.linear.protocol == "lbfgs" and cfg.linear.l2_grid == (0.1, 1.0) and cfg.linear.redraws == 5


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("downstream_src"), tmp_path_factory.mktemp("downstream_shards")
    write_all(src, 20, 0)
    convert("rsna_pneumonia", src / "rsna_pneumonia", out, max_side=96, workers=1, seed=0, progress=False)
    return str(out)


TINY = [
    "data.image_size=64",
    "data.crop_size=64",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "data.backend=torch",
    "model.baseline=g2d_tiny",
]


def test_lbfgs_protocol_end_to_end_says_what_ran(rsna_root, tmp_path):
    quiet = dict(output_root=str(tmp_path), log=lambda *_: None)
    rec = run_eval(
        "rsna_linear", "random", "0.1", rsna_root, TINY + ["linear.protocol=lbfgs", "linear.redraws=3"], **quiet
    )
    m = rec["metrics"]
    assert m["protocol"] == "lbfgs" and m["augment"] == "none" and rec["config"]["linear"]["protocol"] == "lbfgs"
    assert rec["headline"]["name"] == "auroc_mean" and rec["headline"]["value"] == m["auroc_mean"]
    assert m["n_draws"] == 3 and m["n_train"] == rec["data"]["train_subset"]["images"]
    assert all(d["converged"] for d in m["draws"])
    assert m["auroc_mean"] == pytest.approx(np.mean([d["test"]["auroc"] for d in m["draws"]]))
    # The plain keys and predictions.npz are the first draw's: its interval brackets its value.
    pred = load_predictions(rec["results_path"].replace("results.json", "predictions.npz"))
    assert len(pred["keys"]) == m["n_test"] and m["auroc"] == pytest.approx(m["draws"][0]["test"]["auroc"])
    low, high = rec["ci95"]["auroc"]
    assert low <= m["auroc"] <= high or math.isnan(m["auroc"])
    mgca = run_eval("rsna_linear", "random", "0.1", rsna_root, TINY + ["train.epochs=1", "data.batch_size=4"], **quiet)
    assert mgca["metrics"]["protocol"] == "mgca" and mgca["headline"]["name"] == "auroc"
