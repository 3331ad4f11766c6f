"""`make bench-quality`: can the benchmark tell G2D from its ablations? Library side (stages + CLI: bench/quality.py).

    BenchScale                 one scale's sizes (configs/quality/{smoke,full}.yaml)
    run_stages(stages, dir)    resumable stage runner: a stage whose done-marker matches is skipped
    pretrain_command(...)      argv of one pretraining arm (run as a subprocess, as `make pretrain` runs it)
    evaluate_run(...)          one downstream task for one arm -> results.json + predictions.npz
    retrieval_predictions(...) image->report ranks on the pretraining valid split (per-image hits)
    assemble(...)              per task: each arm's headline + 95% CI, paired differences with CIs
    markdown_table(...)        the table for docs/quality.md

Arms: `g2d` (VLA + PA), `vla_only` (model.pa_weight=0: same forward, pseudo-mask and decoder, so the
same compute; only the PA gradient is gone) and `random` (the g2d architecture at random init, text
tower included, as eval/runner.run_all builds it). Paired differences resample the same test
patients for both arms (eval/bootstrap.paired_difference), so they resolve much smaller gaps than
two overlapping per-arm intervals suggest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.pseudo_mask_quality import COMPARISONS
from common.config import ConfigError, config_from_dict, config_to_dict, load_config
from common.dist import DistInfo
from common.io import atomic_write_json
from eval.bootstrap import N_RESAMPLES, paired_difference, percentile_ci, resample_weights
from eval.checkpoint import Pretrained
from eval.runner import PREDICTIONS_NAME, load_predictions, resolve_for, run_eval
from eval.tasks import applicable_overrides, get_task, load_task_config
from eval.zeroshot import embed_loader
from model.text import load_tokenizer
from pipeline import DataConfig, build_loader

ARMS = ("g2d", "vla_only", "random")
TRAINED_ARMS = ("g2d", "vla_only")
ARM_LABELS = {"g2d": "G2D (VLA+PA)", "vla_only": "VLA only", "random": "random init"}
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "quality"
PRETRAIN_CONFIG = CONFIG_DIR / "pretrain.yaml"
FAMILY_TITLES = {
    "zeroshot_cls": "zero-shot classification",
    "grounding": "grounding",
    "linear": "linear probe",
    "segmentation": "segmentation",
    "detection": "detection",
    "retrieval": "retrieval",
}
# Metrics the table shows under the headline one. Segmentation's Dice (MGCA's empty rule) is a mean
# over all test images, and a negative image scores 0 or 1 (an empty prediction or not), so on
# these ~60% negative test sets the headline can swing by tens of points with the negatives alone:
# the two halves show which one moved.
TABLE_SECONDARY = {"segmentation": ("dice_positive", "dice_negative_images")}


@dataclass
class BenchScale:
    name: str = "smoke"
    studies: int = 120  # synthetic MIMIC studies (1-3 images each, ~1 frontal packed)
    synth_size: int = 256  # rendered longer side of the corpus images
    rsna_images: int = 60  # RSNA look-alike images (test split ~20%)
    siim_images: int = 60  # SIIM look-alike images (test split ~15%)
    downstream_max_side: int = 256  # stored downstream image side (the tasks read <= 256 px)
    pretrain_overrides: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)  # every task (keys a task lacks are dropped)
    runs: list[str] = field(default_factory=list)  # "task@fraction"


def load_scale(name_or_path: str, overrides: list[str] | None = None) -> BenchScale:
    """`smoke` / `full` (configs/quality/<name>.yaml) or a YAML path, with key=value overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "pretrain")
        raise FileNotFoundError(f"bench scale {name_or_path!r}: no such file {path} (choose one of {known})")
    scale = load_config(BenchScale, path, overrides)
    for spec in scale.runs:
        parse_run(spec)  # a typo fails here, not after hours of pretraining
    return scale


def parse_run(spec: str) -> tuple[str, str]:
    """'siim_segmentation@0.1' -> ('siim_segmentation', '0.1'); the task name is checked."""
    task, sep, fraction = spec.partition("@")
    if not sep or fraction not in ("0.01", "0.1", "1.0"):
        raise ConfigError(f"bench run {spec!r}: expected <task>@<0.01|0.1|1.0>")
    get_task(task)
    return task, fraction


def fingerprint(obj) -> str:
    """Stable short hash of a JSON-able description of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Resumable stages


@dataclass
class Stage:
    name: str  # unique; also the done-marker's file name
    run: Callable[[dict], dict]  # (results of earlier stages by name) -> JSON-able result
    inputs: dict = field(default_factory=dict)  # what the result depends on; a change re-runs the stage


def marker_path(state_dir: Path, name: str) -> Path:
    return state_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".done.json")


def run_stages(stages: list[Stage], state_dir: str | Path, log=print) -> dict[str, dict]:
    """Run `stages` in order; each finished one writes `<state_dir>/<name>.done.json` atomically
    ({stage, inputs fingerprint, result, seconds}). A stage whose marker exists with the same
    fingerprint is skipped and its recorded result reused, so a killed benchmark continues at the
    first stage that did not finish (a stage killed half-way starts again; pretraining inside it
    continues from its own checkpoints). Returns {name: result}."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate stage names: {sorted({n for n in names if names.count(n) > 1})}")
    results: dict[str, dict] = {}
    for stage in stages:
        marker = marker_path(state_dir, stage.name)
        key = fingerprint(stage.inputs)
        if marker.is_file():
            try:
                done = json.loads(marker.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                done = {}  # a damaged marker only costs re-running its stage
            if isinstance(done, dict) and done.get("fingerprint") == key and "result" in done:
                results[stage.name] = done["result"]
                log(f"[bench-quality] {stage.name}: done earlier ({done.get('seconds', 0):.0f} s), skipped")
                continue
        log(f"[bench-quality] {stage.name} ...")
        t0 = time.perf_counter()
        result = stage.run(results)
        seconds = time.perf_counter() - t0
        atomic_write_json(
            marker,
            {"stage": stage.name, "fingerprint": key, "inputs": stage.inputs, "result": result, "seconds": seconds},
        )
        results[stage.name] = result
        log(f"[bench-quality] {stage.name}: {seconds:.0f} s")
    return results


def stage_seconds(state_dir: str | Path, names: list[str]) -> dict[str, float]:
    """{stage: seconds} from the done-markers of `names` (each stage's measured wall time, also when
    it ran in an earlier, interrupted invocation)."""
    out = {}
    for name in names:
        done = json.loads(marker_path(Path(state_dir), name).read_text(encoding="utf-8"))
        out[name] = round(float(done["seconds"]), 1)
    return out


# ---------------------------------------------------------------------------------------------
# Pretraining arms (run by the caller as a subprocess)


def arm_overrides(arm: str) -> list[str]:
    if arm == "g2d":
        return []
    if arm == "vla_only":
        return ["model.pa_weight=0"]
    raise ValueError(f"arm {arm!r} is not pretrained; trained arms: {TRAINED_ARMS}")


def pretrain_command(
    python: str, arm: str, seed: int, scale: BenchScale, shards: str, text_model: str, output_dir: str
) -> list[str]:
    """argv of `python -m train.pretrain` for one arm: the shared recipe + the scale's step count +
    the arm's switch. train.resume=auto (the default) makes a re-run continue from its checkpoints."""
    return [
        python,
        "-m",
        "train.pretrain",
        "--config",
        str(PRETRAIN_CONFIG),
        f"data.shards={shards}",
        f"model.text_model={text_model}",
        f"train.output_dir={output_dir}",
        f"train.seed={seed}",
        *scale.pretrain_overrides,
        *arm_overrides(arm),
    ]


# ---------------------------------------------------------------------------------------------
# Evaluation of one arm


def arm_weights(checkpoint: str, arm: str, task: str, fraction: str, data_root: str) -> Pretrained:
    """Weights of `arm`: its own checkpoint, or random init of `checkpoint`'s architecture."""
    cfg = load_task_config(task, fraction, data_root)
    weights = resolve_for(cfg, checkpoint)
    return weights.random_like() if arm == "random" else weights


def variants_for(task: str, arm: str) -> list[str]:
    """Segmentation: the encoder variant for every arm; encoder_decoder (the pretrained U-Net decoder)
    only for the trained arms (random init has no decoder worth transferring)."""
    if get_task(task).family != "segmentation":
        return [""]
    return ["encoder", "encoder_decoder"] if arm in TRAINED_ARMS else ["encoder"]


def evaluate_run(
    task: str,
    fraction: str,
    variant: str,
    weights: Pretrained,
    data_root: str,
    overrides: list[str],
    output_root: str,
    log=print,
) -> dict:
    """One task for one arm -> {results, predictions, family, headline, value, ci95, seconds}."""
    keep, _unused = applicable_overrides(get_task(task), overrides)
    extra = [f"segmentation.variant={variant}"] if variant else []
    rec = run_eval(
        task,
        fraction=fraction,
        data_root=data_root,
        overrides=keep + extra,
        output_root=output_root,
        weights=weights,
        log=log,
    )
    run_dir = Path(rec["results_path"]).parent
    return {
        "results": rec["results_path"],
        "predictions": str(run_dir / PREDICTIONS_NAME),
        "family": rec["family"],
        "headline": rec["headline"]["name"],
        "value": rec["headline"]["value"],
        "ci95": rec["headline"]["ci95"],
        "chance": rec["metrics"].get("pointing_chance"),  # grounding: a random peak cell's pointing game
        "seconds": rec["seconds"],
    }


@torch.no_grad()
def retrieval_predictions(
    weights: Pretrained, pretrain_data: dict, text_model: str, device, batch_size: int = 32
) -> dict:
    """Image->report retrieval on the pretraining valid split. -> {keys, rank} (rank 0 = own report
    first; ties count in the model's favour, as eval/zeroshot.retrieval_topk), so top-k hits are
    `rank < k` per image and bootstrap over images works on them."""
    data_cfg = config_from_dict(DataConfig, pretrain_data)
    data_cfg = dataclasses.replace(
        data_cfg,
        transform=data_cfg.eval_transform,
        shuffle=False,
        drop_last=False,
        batch_size_per_gpu=batch_size,
        num_workers=0,
    )
    tokenizer = load_tokenizer(text_model)
    torch.manual_seed(0)  # the random arm's weights: the same draw every time
    model = weights.build_g2d(text_model).to(device).eval()
    loader = build_loader(
        data_cfg, "valid", DistInfo(rank=0, world_size=1, local_rank=0, device=device), tokenizer=tokenizer
    )
    loader.set_epoch(0)
    emb = embed_loader(model, loader)
    loader.close()
    sim = emb.image @ emb.text.T  # [N, N]
    rank = (sim > sim.diagonal().unsqueeze(1)).sum(dim=1)  # [N]
    return {"keys": np.asarray(emb.keys, dtype=str), "rank": rank.numpy()}


def retrieval_summary(ranks: dict[str, dict], seed: int = 0, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Per arm top-k with 95% bootstrap CIs over images, and paired differences (COMPARISONS) on the
    same resamples. `ranks`: {arm: retrieval_predictions(...)}; every arm must cover the same keys."""
    arms = [a for a in ARMS if a in ranks]
    keys = ranks[arms[0]]["keys"]
    order = {arm: np.argsort(ranks[arm]["keys"]) for arm in arms}
    sorted_keys = keys[order[arms[0]]]
    for arm in arms:
        if not np.array_equal(ranks[arm]["keys"][order[arm]], sorted_keys):
            raise ValueError(f"retrieval: arm {arm} was scored on other valid images than {arms[0]}")
    n = len(sorted_keys)
    W = resample_weights(n, None, N_RESAMPLES, seed)  # [R, n]
    out: dict = {"num_images": n, "chance": {f"top{k}": min(1.0, k / n) for k in ks}, "arms": {}, "diffs": {}}
    hits = {arm: {k: (ranks[arm]["rank"][order[arm]] < k).astype(np.float64) for k in ks} for arm in arms}
    for arm in arms:
        out["arms"][arm] = {
            f"top{k}": {"value": float(hits[arm][k].mean()), "ci95": percentile_ci(W @ hits[arm][k] / W.sum(1))}
            for k in ks
        }
    for b, a in COMPARISONS:
        if a in hits and b in hits:
            out["diffs"][f"{b}-{a}"] = {f"top{k}": _diff(W, hits[b][k], hits[a][k]) for k in ks}
    return out


def _diff(W: np.ndarray, hit_b: np.ndarray, hit_a: np.ndarray) -> dict:
    boot = W @ (hit_b - hit_a) / W.sum(1)
    return {
        "diff": float(hit_b.mean() - hit_a.mean()),
        "ci95": percentile_ci(boot),
        "p_b_better": float((boot > 0).mean()),
    }


# ---------------------------------------------------------------------------------------------
# Assembling quality.json


def task_comparisons(evals: dict[str, dict], seed: int = 0) -> dict:
    """evals: {arm: evaluate_run(...) result} of ONE task/fraction/variant -> {family, headline, arms:
    {arm: {value, ci95, results}}, diffs: {"b-a": {metric: {a, b, diff, ci95, p_b_better}}}} (every
    top-level metric of the family; the headline one first)."""
    first = next(iter(evals.values()))
    family, headline = first["family"], first["headline"]
    out = {
        "family": family,
        "headline": headline,
        "arms": {arm: {"value": e["value"], "ci95": e["ci95"], "results": e["results"]} for arm, e in evals.items()},
        "diffs": {},
    }
    if first.get("chance") is not None:
        out["chance"] = first["chance"]
    for metric in TABLE_SECONDARY.get(family, ()):
        for arm, e in evals.items():
            rec = json.loads(Path(e["results"]).read_text(encoding="utf-8"))
            value, ci = rec["metrics"].get(metric), rec.get("ci95", {}).get(metric)
            out["arms"][arm].setdefault("secondary", {})[metric] = {"value": value, "ci95": ci}
    preds = {arm: load_predictions(e["predictions"]) for arm, e in evals.items()}
    for b, a in COMPARISONS:
        if a in preds and b in preds:
            diffs = paired_difference(family, preds[a], preds[b], seed=seed)
            ordered = {headline: diffs[headline]} if headline in diffs else {}
            ordered.update({k: v for k, v in diffs.items() if "." not in k and k != headline})
            out["diffs"][f"{b}-{a}"] = ordered
    return out


def run_label(task: str, fraction: str, variant: str) -> str:
    return f"{task}@{fraction}" + (f"/{variant}" if variant else "")


def assemble(
    scale: BenchScale,
    seeds: list[int],
    eval_results: dict,
    retrieval: dict,
    pseudo_masks: dict,
    arms: dict,
    timing: dict,
) -> dict:
    """quality.json. eval_results: {seed: {run_label: {arm: evaluate_run result}}};
    retrieval: {seed: retrieval_summary}; pseudo_masks: {seed: {arm: summary}}."""
    per_seed = {}
    for seed in seeds:
        tasks = {}
        for label, evals in eval_results[seed].items():
            # The encoder_decoder variant has no random arm; its comparison with random uses the
            # random encoder run of the same task (what a user would otherwise start from).
            task_part, _, variant = label.partition("/")
            if variant == "encoder_decoder" and "random" not in evals:
                fallback = eval_results[seed].get(f"{task_part}/encoder", {}).get("random")
                if fallback is not None:
                    evals = {**evals, "random": fallback}
            tasks[label] = task_comparisons(evals, seed=0)
        per_seed[str(seed)] = {"tasks": tasks, "retrieval": retrieval[seed], "pseudo_mask_iou": pseudo_masks[seed]}
    return {
        "benchmark": "bench-quality",
        "scale": config_to_dict(scale),
        "seeds": seeds,
        "arms": arms,
        "comparisons": [f"{b}-{a}" for b, a in COMPARISONS],
        "bootstrap_resamples": N_RESAMPLES,
        "results": per_seed,
        "timing_seconds": timing,
    }


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100 * v:.1f}"


def _value_ci(value, ci) -> str:
    return _pct(value) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")


def _diff_cell(d: dict | None) -> str:
    if not d:
        return "-"
    ci = d.get("ci95")
    text = f"{100 * d['diff']:+.1f}" if d.get("diff") is not None and np.isfinite(d["diff"]) else "n/a"
    if ci:
        text += f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
        if ci[0] > 0 or ci[1] < 0:
            text = f"**{text}**"  # the interval excludes 0: a difference this test set resolves
    return text


def markdown_table(quality: dict) -> str:
    """One table per seed: family | run | metric | each arm [95% CI] | G2D-VLA | G2D-random (percent
    points, paired 95% CI; bold = the interval excludes 0), + retrieval and pseudo-mask IoU rows."""
    lines = []
    head = (
        "| family | task | metric | G2D (VLA+PA) | VLA only | random init | G2D - VLA | G2D - random |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for seed, res in quality["results"].items():
        lines += [
            f"Pretraining seed {seed}; percent, value [95% bootstrap CI]; differences in points with the "
            f"paired-bootstrap 95% CI ({quality['bootstrap_resamples']} resamples), bold where it excludes 0.",
            "",
            head,
        ]
        rt = res["retrieval"]
        for k in ("top1", "top5"):
            cells = [
                _value_ci(rt["arms"][a][k]["value"], rt["arms"][a][k]["ci95"]) if a in rt["arms"] else "-" for a in ARMS
            ]
            lines.append(
                f"| retrieval | pretraining valid ({rt['num_images']} images, chance "
                f"{_pct(rt['chance'][k])}) | {k} | " + " | ".join(cells) + " | "
                f"{_diff_cell(rt['diffs'].get('g2d-vla_only', {}).get(k))} | "
                f"{_diff_cell(rt['diffs'].get('g2d-random', {}).get(k))} |"
            )
        for label, t in res["tasks"].items():
            h = t["headline"]
            where = label + (f", chance {_pct(t['chance'])}" if "chance" in t else "")
            rows = [(h, t["arms"])]
            for metric in TABLE_SECONDARY.get(t["family"], ()):
                found = {a: e["secondary"][metric] for a, e in t["arms"].items() if metric in e.get("secondary", {})}
                if found:
                    rows.append((metric, found))
            for metric, per_arm in rows:
                cells = [_value_ci(per_arm[a]["value"], per_arm[a]["ci95"]) if a in per_arm else "-" for a in ARMS]
                lines.append(
                    f"| {FAMILY_TITLES.get(t['family'], t['family'])} | {where} | {metric} | "
                    + " | ".join(cells)
                    + f" | {_diff_cell(t['diffs'].get('g2d-vla_only', {}).get(metric))} | "
                    f"{_diff_cell(t['diffs'].get('g2d-random', {}).get(metric))} |"
                )
        pm = res["pseudo_mask_iou"]
        if pm:
            for metric, where in (
                ("iou", f"{pm['num_images']} valid images with a finding"),
                ("pointing", f"peak cell in a region; chance {_pct(pm['pointing_chance'])}"),
            ):
                cells = [
                    _value_ci(pm["arms"][a][metric]["value"], pm["arms"][a][metric]["ci95"]) if a in pm["arms"] else "-"
                    for a in ARMS
                ]
                diffs = [
                    _diff_cell(pm["diffs"].get(pair)) if metric == "iou" else "-"
                    for pair in ("g2d-vla_only", "g2d-random")
                ]
                lines.append(
                    f"| pseudo-mask vs true regions | {where} | {metric} | "
                    + " | ".join(cells)
                    + f" | {diffs[0]} | {diffs[1]} |"
                )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
