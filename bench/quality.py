"""`make bench-quality`: a quality benchmark that can tell G2D from its ablations (docs/quality.md).

    python -m bench.quality --scale full|smoke [--out DIR] [--seeds 0,1,2] [--arms g2d,vla_only,...]
                            [--studies N] [--results quality.json] [--doc docs/quality.md] [scale.key=value ...]

synthetic MIMIC corpus -> shards (+ verify) -> tiny BERT -> synthetic RSNA/SIIM/ChestX-ray14 look-alikes
-> per pretraining seed: pretrain each trained arm (vla_only, reconstruction, g2d, g2d_shuffled: one
model.decoder_target each, subprocesses of train.pretrain, equal steps and compute) -> every downstream
task for each arm and random init (downstream seed 42 + the pretraining seed) -> retrieval and
pseudo-mask IoU / collapse on the pretraining valid split -> quality.json (per arm/task/seed: headline
with its 95% CI and paired differences; across seeds: mean +- std per arm, per-seed paired differences
with a t-interval and a finding/undecided verdict; Table 5a; collapse) + the tables.
Every stage writes a done-marker under <out>/stages/ when it finishes: a killed run, started again
with the same arguments, continues with the first unfinished stage (pretraining from its checkpoints).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import perfdoc
from bench.pseudo_mask_quality import pseudo_mask_predictions, pseudo_mask_summary
from bench.quality_harness import (
    TRAINED_ARMS,
    Stage,
    arm_weights,
    assemble,
    check_arms,
    evaluate_run,
    fingerprint,
    load_scale,
    markdown_table,
    parse_run,
    pretrain_command,
    readme_bullet,
    recipe_inputs,
    replace_readme_bullet,
    retrieval_predictions,
    retrieval_summary,
    run_label,
    run_stages,
    stage_seconds,
    text_tower_dir,
    tower_label,
    training_mask_iou,
    variants_for,
)
from common.cli import ArgumentParser, UserError, run_main
from common.config import ConfigError, config_to_dict, layered_overrides
from common.io import atomic_write_json, atomic_write_text
from common.run_layout import newest_checkpoint
from eval.runner import load_predictions, save_predictions
from shards.downstream import convert
from shards.ensure import ensure_synthetic
from shards.mimic import SYNTHETIC_SAMPLES_PER_SHARD, PackOptions
from shards.schema import read_manifest
from shards.synthetic.downstream import write_all
from shards.writer import default_workers
from tools import make_tiny_bert, pack_shards, verify_shards
from tools.eval import EVAL_USER_ERRORS

ROOT = Path(__file__).resolve().parents[1]
# The evaluation seed of the runs under pretraining seed s: TaskConfig's default (42) at seed 0, so every
# arm of one seed shares its downstream randomness (a paired comparison) and each seed draws its own.
EVAL_SEED_BASE = 42


def parse_arms(text: str) -> list[str]:
    """--arms 'g2d,vla_only,random' -> the arms in table order (bench/quality_harness.ARMS)."""
    return check_arms([a.strip() for a in text.split(",") if a.strip()])


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give one or more distinct seeds")
    return seeds


@dataclass(frozen=True)
class Workspace:
    """Where the stages write, under the working directory `out`."""

    out: Path

    @property
    def corpus(self) -> Path:
        return self.out / "synthetic_mimic"

    @property
    def shards(self) -> Path:
        return self.out / "shards" / "mimic"

    @property
    def bert(self) -> Path:
        return self.out / "tiny_bert"

    def text_model(self, scale) -> str:
        """The text tower every arm starts from: the tiny BERT built here or a pretrained directory."""
        return str(text_tower_dir(scale.text_tower, self.bert))

    @property
    def src(self) -> Path:
        return self.out / "downstream_src"

    @property
    def data(self) -> Path:
        return self.out / "shards" / "downstream"


# What each stage's result depends on (its done-marker's fingerprint): change one and the stage and
# everything downstream of it runs again. Evaluations depend on every scale key but the run list, the
# seed, arm and segmentation-variant selections and the report's Table 5a columns (and on their own
# run's run_overrides only).
def size_inputs(scale) -> dict:
    return {"studies": scale.studies, "synth_size": scale.synth_size}


def data_inputs(scale) -> dict:
    skip = ("runs", "name", "seeds", "arms", "table5a", "run_overrides", "text_tower", "segmentation_variants")
    return {**{k: v for k, v in config_to_dict(scale).items() if k not in skip}, **recipe_inputs(scale)}


def data_stages(scale, ws: Workspace, workers: int) -> list[Stage]:
    """The pretraining corpus packed + verified, its tiny BERT, the RSNA/SIIM/ChestX-ray14 look-alikes
    converted (ChestX-ray14 when cxr14_images > 0)."""

    def make_corpus(_done):
        root = ensure_synthetic(ws.corpus, scale.studies, scale.synth_size, 0, workers)
        options = PackOptions(
            max_side=256, quality=95, samples_per_shard=SYNTHETIC_SAMPLES_PER_SHARD, workers=workers, seed=0
        )
        pack_shards.pack(root, ws.shards, options)
        if verify_shards.verify(ws.shards, default_workers()):
            raise UserError(f"packing or verifying {ws.shards} failed (see above)")
        splits = read_manifest(ws.shards)["splits"]
        return {"shards": str(ws.shards), "splits": {s: v["num_samples"] for s, v in splits.items()}}

    def make_bert(_done):
        make_tiny_bert.build(ws.shards, ws.bert)
        return {"text_model": str(ws.bert)}

    def make_downstream(_done):
        splits = {}
        sizes = (
            ("rsna_pneumonia", scale.rsna_images),
            ("siim_pneumothorax", scale.siim_images),
            ("chestxray14", scale.cxr14_images),
        )
        for name, n in (size for size in sizes if size[1] > 0):
            write_all(ws.src, n, seed=0, workers=workers, datasets=(name,))
            manifest = convert(
                name,
                ws.src / name,
                ws.data,
                max_side=scale.downstream_max_side,
                workers=workers,
                seed=0,
                progress=False,
            )
            splits[name] = {s: v["num_samples"] for s, v in manifest["splits"].items()}
        return {"data": str(ws.data), "splits": splits}

    return [
        Stage("corpus", make_corpus, size_inputs(scale)),
        Stage("tiny_bert", make_bert, size_inputs(scale)),
        Stage(
            "downstream",
            make_downstream,
            {
                "rsna": scale.rsna_images,
                "siim": scale.siim_images,
                "max_side": scale.downstream_max_side,
                # Absent when 0, so a scale without ChestX-ray14 keeps the two-dataset stage's fingerprint.
                **({"cxr14": scale.cxr14_images} if scale.cxr14_images else {}),
            },
        ),
    ]


def pretrain_stage(scale, ws: Workspace, arm: str, seed: int) -> Stage:
    """One trained arm: train.pretrain in a subprocess, resumed from its checkpoints on a re-run."""
    inputs = {**size_inputs(scale), "overrides": scale.pretrain_overrides, "seed": seed, **recipe_inputs(scale)}
    # The fingerprint in the folder name: a changed recipe starts a fresh run instead of resuming
    # (train.resume=auto) a checkpoint trained with the old one.
    run_dir = ws.out / "pretrain" / f"{arm}_s{seed}_{fingerprint(inputs)[:8]}"

    def run(_done):
        cmd = pretrain_command(sys.executable, arm, seed, scale, str(ws.shards), ws.text_model(scale), str(run_dir))
        print("[bench-quality] $ " + " ".join(cmd), flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        ckpt = newest_checkpoint(run_dir)
        if code or ckpt is None:
            raise UserError(
                f"pretraining arm {arm} (seed {seed}) failed with exit status {code}; "
                f"log: {run_dir}/metrics.jsonl; re-run to resume it"
            )
        return {"checkpoint": str(ckpt), "run_dir": str(run_dir)}

    return Stage(f"pretrain/{arm}/s{seed}", run, inputs)


def architecture_arm(arms: list[str]) -> str:
    """The trained arm whose checkpoint gives random init its architecture (and the pretraining data
    config of the per-image stages): G2D when it runs, else the first trained arm selected."""
    return "g2d" if "g2d" in arms else next(a for a in arms if a in TRAINED_ARMS)


def checkpoint_of(done: dict, arm: str, seed: int, arms: list[str]) -> str:
    # The random arm takes a trained checkpoint's architecture (and random weights).
    return done[f"pretrain/{architecture_arm(arms) if arm == 'random' else arm}/s{seed}"]["checkpoint"]


def eval_overrides_for(scale, spec: str, seed: int) -> list[str]:
    """The evaluation overrides of one run: the scale's, then the run's own (its epochs replace the
    scale's), then the seed's downstream seed."""
    return layered_overrides(scale.eval_overrides, scale.run_overrides.get(spec, []), [f"seed={EVAL_SEED_BASE + seed}"])


def evaluation_stage(scale, ws: Workspace, arm: str, seed: int, spec: str, variant: str, arms: list[str]) -> Stage:
    """One downstream task (at one fraction, one variant) for one arm, with the seed's evaluation seed."""
    task, fraction = parse_run(spec)
    overrides = eval_overrides_for(scale, spec, seed)

    def run(done):
        weights = arm_weights(checkpoint_of(done, arm, seed, arms), arm, task, fraction, str(ws.data))
        return evaluate_run(
            task, fraction, variant, weights, str(ws.data), overrides, str(ws.out / "eval" / f"{arm}_s{seed}")
        )

    name = f"eval/{arm}/s{seed}/{run_label(task, fraction, variant)}"
    inputs = {**data_inputs(scale), "seed": seed}
    if scale.run_overrides.get(spec):
        inputs["run_overrides"] = scale.run_overrides[spec]
    return Stage(name, run, inputs)


def per_image_stage(
    scale, ws: Workspace, kind: str, arm: str, seed: int, device: torch.device, arms: list[str]
) -> Stage:
    """retrieval ranks / pseudo-mask IoU and collapse of one arm on the pretraining valid split -> an npz."""
    path = ws.out / kind / f"{arm}_s{seed}.npz"

    def run(done):
        ckpt = checkpoint_of(done, arm, seed, arms)
        weights = arm_weights(ckpt, arm, "zeroshot_rsna", "1.0", str(ws.data))
        base = architecture_arm(arms)
        pretrain_data = arm_weights(
            checkpoint_of(done, base, seed, arms), base, "zeroshot_rsna", "1.0", str(ws.data)
        ).data_cfg
        if kind == "retrieval":
            arrays = retrieval_predictions(weights, pretrain_data, ws.text_model(scale), device, seed=seed)
        else:
            arrays = pseudo_mask_predictions(weights, pretrain_data, ws.text_model(scale), ws.corpus, device, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_predictions(path, arrays)
        return {"predictions": str(path), "images": int(len(arrays["keys"]))}

    inputs = {**size_inputs(scale), "pretrain": scale.pretrain_overrides, "seed": seed, **recipe_inputs(scale)}
    return Stage(f"{kind}/{arm}/s{seed}", run, inputs)


def build_stages(
    scale, seeds: list[int], out: Path, workers: int, device: torch.device, arms: list[str] | None = None
) -> list[Stage]:
    arms = check_arms(list(arms or scale.arms))
    ws = Workspace(out)
    stages = data_stages(scale, ws, workers)
    # Order: seed by seed (a stopped run has whole seeds to compare); within a seed each trained arm's
    # pretraining is followed by its evaluations, and random init (its weights and downstream seed
    # drawn per pretraining seed, its architecture a trained checkpoint's) follows the first trained
    # arm. So the first answer, trained vs random init, lands before the second arm trains.
    for seed in seeds:
        trained = [a for a in arms if a in TRAINED_ARMS]
        for arm in trained:
            stages.append(pretrain_stage(scale, ws, arm, seed))
            evaluated = [arm] + (["random"] if arm == trained[0] and "random" in arms else [])
            # The cheap per-image stages first, then the tasks in the scale's order (cheap ones first).
            stages += [
                per_image_stage(scale, ws, kind, a, seed, device, arms)
                for kind in ("retrieval", "pseudo_mask")
                for a in evaluated
            ]
            for spec in scale.runs:
                task = parse_run(spec)[0]
                for a in evaluated:
                    stages += [
                        evaluation_stage(scale, ws, a, seed, spec, v, arms)
                        for v in variants_for(task, a, scale.segmentation_variants)
                    ]
    return stages


def report(scale, seeds: list[int], arm_names: list[str], done: dict, state_dir: Path) -> dict:
    """quality.json from the finished stages."""
    evals, retrieval, pseudo = {}, {}, {}
    for seed in seeds:
        evals[seed] = {}
        for name, result in done.items():
            parts = name.split("/", 3)
            if parts[0] == "eval" and int(parts[2][1:]) == seed:
                evals[seed].setdefault(parts[3], {})[parts[1]] = result
        retrieval[seed] = retrieval_summary(
            {arm: load_predictions(done[f"retrieval/{arm}/s{seed}"]["predictions"]) for arm in arm_names}
        )
        pseudo[seed] = pseudo_mask_summary(
            {arm: load_predictions(done[f"pseudo_mask/{arm}/s{seed}"]["predictions"]) for arm in arm_names}
        )
    trained = [(arm, seed) for seed in seeds for arm in arm_names if arm in TRAINED_ARMS]
    checkpoints = {f"{arm}/s{seed}": done[f"pretrain/{arm}/s{seed}"]["checkpoint"] for arm, seed in trained}
    logged = {f"{arm}/s{seed}": training_mask_iou(done[f"pretrain/{arm}/s{seed}"]["run_dir"]) for arm, seed in trained}
    data = {k: done[k] for k in ("corpus", "downstream")}
    timing = stage_seconds(state_dir, list(done))
    quality = assemble(scale, seeds, evals, retrieval, pseudo, checkpoints, timing, arm_names, logged)
    return {**quality, "data": data}


def repo_relative(path: Path) -> str:
    """`path` as the README names it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="full", help="smoke | full (configs/quality/<scale>.yaml) or a YAML path")
    ap.add_argument("--out", default=None, help="working directory (default runs/bench_quality/<scale>)")
    ap.add_argument(
        "--seeds",
        default=None,
        help="pretraining seeds, comma-separated (default: the scale's `seeds`; full: 0,1,2)",
    )
    ap.add_argument(
        "--arms",
        default=None,
        help="arms, comma-separated, of g2d, vla_only, reconstruction, g2d_shuffled, random "
        "(default: the scale's `arms`, all five)",
    )
    ap.add_argument("--studies", type=int, default=None, help="synthetic training corpus size (overrides the scale)")
    ap.add_argument(
        "--results",
        default=None,
        help="quality.json (default bench/results/quality.json at full scale, else <out>/quality.json)",
    )
    ap.add_argument(
        "--doc",
        default=None,
        help="markdown file whose '## Results' section gets the table "
        "(default: docs/quality.md at full scale, none otherwise)",
    )
    ap.add_argument(
        "--readme",
        default=None,
        help="file whose bench-quality block gets the quality bullet written from quality.json "
        "(default: README.md at full scale with the tiny text tower, none otherwise)",
    )
    ap.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    ap.add_argument("overrides", nargs="*", help="scale overrides, e.g. eval_overrides=[train.epochs=2]")
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + ([f"studies={args.studies}"] if args.studies is not None else [])
    scale = load_scale(args.scale, overrides)
    if scale.studies < 20:
        raise UserError(f"studies={scale.studies}: at least 20 (every split needs a study)")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else list(scale.seeds)
    arm_names = parse_arms(args.arms) if args.arms is not None else check_arms(scale.arms)
    full = scale.name == "full"
    # Another text tower is another benchmark: its own working directory, results file and doc section.
    tower = "" if scale.text_tower == "tiny" else f"_{tower_label(scale.text_tower)}"
    # Absolute: the pretraining subprocesses run from the repository root, whatever our cwd is.
    out = Path(args.out or f"runs/bench_quality/{scale.name}{tower}").resolve()
    text_tower_dir(scale.text_tower, out / "tiny_bert")  # a missing tower fails now, not after the corpus
    results = Path(args.results or (f"bench/results/quality{tower}.json" if full else out / "quality.json"))
    doc = args.doc or ("docs/quality.md" if full else None)
    readme = Path(args.readme) if args.readme else (ROOT / "README.md" if full and not tower else None)
    if readme is not None:  # checked now, not after hours of stages
        try:
            replace_readme_bullet(readme.read_text(encoding="utf-8"), "")
        except (OSError, ValueError) as exc:
            raise UserError(f"--readme {readme}: {exc}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, args.workers))
    state_dir = out / "stages"
    done = run_stages(build_stages(scale, seeds, out, args.workers, device, arm_names), state_dir)
    quality = report(scale, seeds, arm_names, done, state_dir)
    quality["device"] = str(device)
    atomic_write_json(results, quality)
    table = markdown_table(quality)
    if doc:
        if not Path(doc).is_file():  # update_section would start it with performance.md's header
            atomic_write_text(Path(doc), "# Quality benchmark results (`make bench-quality`)\n")
        section = f"Results ({scale.name} scale{', text tower ' + tower[1:] if tower else ''})"
        perfdoc.update_section(Path(doc), section, table)
    if readme is not None:
        shown = [repo_relative(Path(p)) for p in (results, doc or results)]  # where the bullet points to
        text = replace_readme_bullet(readme.read_text(encoding="utf-8"), readme_bullet(quality, *shown))
        atomic_write_text(readme, text)
    total = sum(quality["timing_seconds"].values())
    print("\n" + table)
    print(
        f"[bench-quality] {results} ({len(done)} stages, {total / 60:.1f} min of stage time)"
        + (f"; table -> {doc}" if doc else "")
        + (f"; bullet -> {readme}" if readme is not None else "")
    )
    return 0


if __name__ == "__main__":
    run_main(main, extra_errors=EVAL_USER_ERRORS + (ConfigError,))
