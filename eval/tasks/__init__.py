"""The downstream task registry: name -> family, dataset, config class and run function.

    TASKS[name]          Task(name, family, dataset, paper table it fills)
    get_task(name)       unknown name -> UnknownTask listing the valid names
    load_task_config(name, fraction, data_root, overrides) -> the family's config dataclass
    run_task(task, cfg, weights, out_dir, device) -> {"metrics", "headline", "plots"}

Families (one module each): linear, segmentation, detection (YOLOv3), finetune, zeroshot_cls,
grounding. Each task's defaults (the paper's hyperparameters, prompt templates) are in
configs/eval/<name>.yaml; the family module's docstring states the protocol.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

from common.config import ConfigError, apply_overrides, check_fields, config_from_dict, deep_merge, read_yaml
from eval.tasks.base import FRACTIONS
from eval.tasks.fit import log_info

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"


@dataclass(frozen=True)
class Task:
    name: str
    family: str  # module under eval/tasks/
    dataset: str  # directory under the downstream shards root

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / f"{self.name}.yaml"

    @property
    def module(self):
        return importlib.import_module(f"eval.tasks.{self.family}")


_TASKS = [
    Task("chexpert_linear", "linear", "chexpert"),
    Task("rsna_linear", "linear", "rsna_pneumonia"),
    Task("covidx_linear", "linear", "covidx"),
    Task("siim_segmentation", "segmentation", "siim_pneumothorax"),
    Task("rsna_segmentation", "segmentation", "rsna_pneumonia"),
    Task("rsna_detection", "detection", "rsna_pneumonia"),
    Task("object_cxr_detection", "detection", "object_cxr"),
    Task("chestxray14_finetune", "finetune", "chestxray14"),
    Task("zeroshot_rsna", "zeroshot_cls", "rsna_pneumonia"),
    Task("zeroshot_siim", "zeroshot_cls", "siim_pneumothorax"),
    Task("zeroshot_chestxray14", "zeroshot_cls", "chestxray14"),
    Task("zeroshot_chexpert", "zeroshot_cls", "chexpert"),
    Task("grounding_rsna", "grounding", "rsna_pneumonia"),
    Task("grounding_siim", "grounding", "siim_pneumothorax"),
]
TASKS: dict[str, Task] = {t.name: t for t in _TASKS}
CONFIG_CLASSES = {
    "linear": "LinearConfig",
    "segmentation": "SegmentationConfig",
    "detection": "DetectionConfig",
    "finetune": "FinetuneConfig",
    "zeroshot_cls": "ZeroShotConfig",
    "grounding": "GroundingConfig",
}
# Families that need the text encoder (a full pretraining checkpoint), not only image weights.
TEXT_FAMILIES = ("zeroshot_cls", "grounding")


class UnknownTask(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownTask(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} (or 'all')")
    return TASKS[name]


def config_class(task: Task) -> type:
    return getattr(task.module, CONFIG_CLASSES[task.family])


def applicable_overrides(task: Task, overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides whose top-level key exists in this task's config, the others). `--task all` passes
    one ARGS list to every task: `linear.mode=fast` must not break the detection tasks."""
    names = {f.name for f in fields(config_class(task))}
    keep, skip = [], []
    for text in overrides:
        (keep if text.split("=", 1)[0].strip().split(".")[0] in names else skip).append(text)
    return keep, skip


def load_task_config(
    name: str, fraction: str = "1.0", data_root: str | None = None, overrides: list[str] | None = None
):
    """configs/eval/<name>.yaml <- its fraction_overrides[<fraction>] <- task/fraction/data root <- overrides."""
    task = get_task(name)
    if fraction not in FRACTIONS:
        raise ConfigError(f"fraction {fraction!r} is not one of {list(FRACTIONS)}")
    raw = read_yaml(task.config_path)
    per_fraction = raw.pop("fraction_overrides", {}) or {}
    unknown = sorted(set(per_fraction) - set(FRACTIONS))
    if unknown:
        raise ConfigError(f"{task.config_path}: fraction_overrides keys {unknown} are not in {list(FRACTIONS)}")
    deep_merge(raw, per_fraction.get(fraction, {}) or {})
    raw["task"], raw["fraction"] = name, fraction
    raw.setdefault("data", {})["dataset"] = task.dataset
    if data_root:
        raw["data"]["root"] = str(data_root)
    apply_overrides(raw, list(overrides or []))
    if raw.get("task") != name or raw["data"].get("dataset") != task.dataset:
        raise ConfigError("task and data.dataset are fixed by the task name; pick another task instead")
    cfg = config_from_dict(config_class(task), raw)
    for f in fields(cfg):  # every section's declared ranges, e.g. data.valid_max_images >= 0
        section = getattr(cfg, f.name)
        if is_dataclass(section):
            check_fields(section, f.name)
    return cfg


def run_task(task: Task, cfg, weights, out_dir: Path, device, log=log_info) -> dict:
    return task.module.run(cfg, weights, out_dir, device, log)
