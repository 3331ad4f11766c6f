"""Deterministic WebDataset shard writing, shared by the MIMIC packer and every downstream converter.

Two layers:
- `write_shard(path, samples)`: one tar + its DALI index (wds2idx "v1.2" format), written atomically.
  Tar headers carry no timestamps/owners, so the same samples give the same bytes on any machine.
- `pack_splits(...)`: the parallel packer. The caller supplies, per split, the ordered list of
  source items (already shuffled with a seed) and a picklable `build_sample(item)` that returns either
  a `PackedSample` or a `Rejected`. Items are cut into shards by position *before* any work is done,
  so shard i always holds the same items whatever the worker count: output is byte-identical for 1 or
  N workers. A rerun keeps shards whose bytes still match the previous manifest and rebuilds the rest.

The writer also adds the sample json's `crc32` field (shards/schema.py) so every converter gets it,
stores each rejection once (in the manifest's `rejected`, tagged with the shard its item belonged
to; a shard record keeps only the count), and strips object addresses from reasons so that two
identical runs write identical manifests. `output_lock(root)` makes a packer the only writer of its
output directory and removes the temp files of killed writers before anything is written.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.cli import UserError
from common.io import DirectoryLock, atomic_open, atomic_write_json, remove_stale_temp_files, sha256_file
from shards.schema import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MEMBER_CRC_FIELD,
    MEMBER_ORDER,
    IndexEntry,
    check_key,
    format_dali_index,
    index_name,
    member_crc32,
    shard_name,
)

# Recorded in the manifest's config: a rerun reuses only shards written by this writer version
# (2: member crc32 in the sample json, rejections stored once).
WRITER_VERSION = 2
LOCK_NAME = ".pack.lock"
_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


class OutputLocked(UserError):
    """Another packer holds the output directory's lock."""


def clean_reason(reason: str) -> str:
    """A rejection reason without object addresses (`<_io.BytesIO object at 0x7f...>`), which
    differ between runs and would make identical runs write different manifests."""
    return _ADDRESS_RE.sub("", reason)


_HELD_LOCKS: dict[Path, int] = {}  # resolved output dir -> nesting depth, in this process


@contextmanager
def output_lock(root: str | Path) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `<root>/.pack.lock` for the block; a second packer on the
    same directory fails at once with `OutputLocked` naming the holder's pid (common.io.DirectoryLock).
    Re-entrant within one process (pack_mimic holds it around pack_splits, which takes it too); on
    entry the temp files a killed packer left (`.<name>.*.tmp` in root and its split folders) are
    removed."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"output {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    real = root.resolve()
    if real in _HELD_LOCKS:
        _HELD_LOCKS[real] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[real] -= 1
        return
    lock = DirectoryLock(
        real,
        LOCK_NAME,
        lambda pid: OutputLocked(
            f"{root} is locked by pid {pid}: another packer is writing there (wait for it to finish, or stop it)"
        ),
    )
    _HELD_LOCKS[real] = 1
    try:
        stale = [
            p
            for d in [real, *sorted(c for c in real.iterdir() if c.is_dir() and not c.is_symlink())]
            for p in remove_stale_temp_files(d)
        ]
        if stale:
            print(f"{root}: removed {len(stale)} temp file(s) left by an interrupted run", file=sys.stderr)
        yield
    finally:
        del _HELD_LOCKS[real]
        lock.release()


@dataclass
class PackedSample:
    key: str
    members: dict[str, bytes]  # extension -> payload; order fixed by MEMBER_ORDER


@dataclass
class Rejected:
    key: str
    source: str
    reason: str


@dataclass
class ShardResult:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    keys: list[str]
    rejected: list[dict] = field(default_factory=list)

    def manifest_entry(self) -> dict:
        return {
            "name": self.name,
            "index": index_name(self.name),
            "num_samples": self.num_samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def check_pack_params(**params: int) -> None:
    """Packing parameters as the user gave them: one `UserError` naming every bad one."""
    lower = {
        "samples_per_shard": 1,
        "quality": 1,
        "max_side": 1,
        "workers": 1,
        "min_side": 1,
        "max_pixels": 1,
        "max_report_bytes": 1,
        "crop_threshold": 0,
    }
    upper = {"quality": 100, "crop_threshold": 254}
    bad = [f"{name}={value}" for name, value in params.items() if value < lower[name] or value > upper.get(name, value)]
    if bad:
        raise UserError(
            f"bad packing parameter(s): {', '.join(bad)} (quality 1..100, crop_threshold 0..254, the others >= 1)"
        )


def with_member_crcs(sample: PackedSample) -> dict[str, bytes]:
    """The sample's members with `crc32` {ext: CRC-32} of every non-json member added to its json
    (compact, key order kept: the bytes depend on the sample only, not on the worker)."""
    if "json" not in sample.members:
        raise ValueError(f"sample {sample.key}: no json member")
    meta = json.loads(sample.members["json"].decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"sample {sample.key}: json member is not an object")
    meta[MEMBER_CRC_FIELD] = {
        ext: member_crc32(sample.members[ext]) for ext in MEMBER_ORDER if ext in sample.members and ext != "json"
    }
    members = dict(sample.members)
    members["json"] = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return members


def write_shard(path: str | Path, samples: Iterable[PackedSample]) -> tuple[int, list[str]]:
    """Write samples to `path` (a .tar) and its `.idx`; returns (num_samples, keys). Atomic."""
    path = Path(path)
    index_rows: list[list[IndexEntry]] = []
    keys: list[str] = []
    with atomic_open(path, "wb") as raw:
        # USTAR headers are exactly one 512-byte block for our short names, so a member's data
        # starts at header offset + 512: that is what DALI's index records.
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                check_key(sample.key)
                unknown = set(sample.members) - set(MEMBER_ORDER)
                if unknown:
                    raise ValueError(f"sample {sample.key}: unknown member type(s) {sorted(unknown)}")
                parts = []
                members = with_member_crcs(sample)
                for ext in MEMBER_ORDER:
                    if ext not in members:
                        continue
                    payload = members[ext]
                    member = f"{sample.key}.{ext}"
                    info = _tarinfo(member, len(payload))
                    header_offset = tar.offset
                    tar.addfile(info, io.BytesIO(payload))
                    parts.append((ext, header_offset + 512, len(payload), member))
                index_rows.append(parts)
                keys.append(sample.key)
    if not keys:
        path.unlink()
        raise ValueError(f"{path}: refusing to write an empty shard")
    with atomic_open(path.with_suffix(".idx"), "w") as fh:
        fh.write(format_dali_index(index_rows))
    return len(keys), keys


@dataclass
class _ShardJob:
    root: str
    name: str
    items: Sequence[Any]
    build_sample: Callable[[Any], PackedSample | Rejected]


def _run_shard_job(job: _ShardJob) -> ShardResult:
    samples: list[PackedSample] = []
    rejected: list[dict] = []
    for item in job.items:
        out = job.build_sample(item)
        if isinstance(out, Rejected):
            rejected.append(
                {"key": out.key, "source": out.source, "reason": clean_reason(out.reason), "shard": job.name}
            )
        else:
            samples.append(out)
    path = Path(job.root) / job.name
    if samples:
        n, keys = write_shard(path, samples)
        return ShardResult(job.name, n, path.stat().st_size, sha256_file(path), keys, rejected)
    # Every item of this shard was rejected: no file, but the rejections are still recorded.
    for stale in (path, path.with_suffix(".idx")):
        stale.unlink(missing_ok=True)
    return ShardResult(job.name, 0, 0, "", [], rejected)


def _previous_shards(root: Path, config: dict) -> dict[str, dict]:
    """Shard records of an earlier run with the same config (for skip-if-intact), else {}; each
    record gets back its rejections (stored once, in the manifest's `rejected`, tagged by shard)."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    # A damaged or hand-edited manifest only costs a rebuild: anything unexpected is not reused.
    if not isinstance(old, dict) or old.get("config") != config:
        return {}
    by_shard: dict[str, list[dict]] = {}
    for rej in old.get("rejected", []) if isinstance(old.get("rejected"), list) else []:
        if isinstance(rej, dict) and isinstance(rej.get("shard"), str):
            by_shard.setdefault(rej["shard"], []).append(rej)
    records = {}
    for rec in old.get("_shard_records", []) if isinstance(old.get("_shard_records"), list) else []:
        if not (isinstance(rec, dict) and all(isinstance(rec.get(f), kind) for f, kind in _RECORD_FIELDS.items())):
            continue
        rejected = by_shard.get(rec["name"], [])
        if len(rejected) == rec["num_rejected"]:
            records[rec["name"]] = {**rec, "rejected": rejected}
    return records


_RECORD_FIELDS = {
    "name": str,
    "num_items": int,
    "num_samples": int,
    "bytes": int,
    "sha256": str,
    "keys": list,
    "num_rejected": int,
}


def _is_intact(root: Path, rec: dict) -> bool:
    path = root / rec["name"]
    if rec["num_samples"] == 0:
        return not path.exists()
    return (
        path.is_file()
        and path.with_suffix(".idx").is_file()
        and path.stat().st_size == rec["bytes"]
        and sha256_file(path) == rec["sha256"]
    )


def pack_splits(
    root: str | Path,
    split_items: dict[str, Sequence[Any]],
    build_sample: Callable[[Any], PackedSample | Rejected],
    samples_per_shard: int,
    workers: int,
    config: dict,
    extra_manifest: dict | None = None,
    progress: bool = True,
) -> dict:
    """Pack every split into `<root>/<split>/<split>-NNNNNN.tar` and write `<root>/manifest.json`.

    `split_items[split]` is the final (already shuffled) order of that split's items.
    `build_sample` must be a picklable top-level callable (it runs in worker processes).
    Returns the manifest dict. The manifest's `rejected` lists every rejected item with its reason.
    """
    with output_lock(root):
        return _pack_splits_locked(
            Path(root),
            split_items,
            build_sample,
            samples_per_shard,
            workers,
            {**config, "shard_writer": WRITER_VERSION},
            extra_manifest,
            progress,
        )


def _pack_splits_locked(
    root: Path,
    split_items: dict[str, Sequence[Any]],
    build_sample: Callable[[Any], PackedSample | Rejected],
    samples_per_shard: int,
    workers: int,
    config: dict,
    extra_manifest: dict | None,
    progress: bool,
) -> dict:
    previous = _previous_shards(root, config)
    jobs: list[_ShardJob] = []
    kept: dict[str, ShardResult] = {}
    for split, items in split_items.items():
        for i, start in enumerate(range(0, len(items), samples_per_shard)):
            name = shard_name(split, i)
            rec = previous.get(name)
            if (
                rec is not None
                and rec["num_items"] == len(items[start : start + samples_per_shard])
                and _is_intact(root, rec)
            ):
                kept[name] = ShardResult(
                    rec["name"], rec["num_samples"], rec["bytes"], rec["sha256"], rec["keys"], rec["rejected"]
                )
                continue
            jobs.append(_ShardJob(str(root), name, items[start : start + samples_per_shard], build_sample))

    results: dict[str, ShardResult] = dict(kept)
    bar = tqdm(
        total=sum(len(j.items) for j in jobs), unit="img", desc=f"packing {root.name}", disable=not progress or not jobs
    )
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results[job.name] = _run_shard_job(job)
            bar.update(len(job.items))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for job, res in zip(jobs, pool.map(_run_shard_job, jobs)):
                results[job.name] = res
                bar.update(len(job.items))
    bar.close()

    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "num_samples": 0,
        "splits": {},
        "rejected": [],
        "config": config,
    }
    records = []
    for split, items in split_items.items():
        n_shards = (len(items) + samples_per_shard - 1) // samples_per_shard
        entries, total = [], 0
        for i in range(n_shards):
            name = shard_name(split, i)
            res = results[name]
            manifest["rejected"].extend(res.rejected)
            num_items = len(items[i * samples_per_shard : (i + 1) * samples_per_shard])
            records.append(
                {
                    "name": name,
                    "num_items": num_items,
                    "num_samples": res.num_samples,
                    "bytes": res.bytes,
                    "sha256": res.sha256,
                    "keys": res.keys,
                    "num_rejected": len(res.rejected),
                }
            )
            if res.num_samples:
                entries.append(res.manifest_entry())
                total += res.num_samples
        manifest["splits"][split] = {"num_samples": total, "shards": entries}
        manifest["num_samples"] += total
    _remove_stale_shards(root, split_items, records)
    manifest.update(extra_manifest or {})
    # Per-shard bookkeeping for skip-if-intact reruns (keys also let eval build subsets).
    manifest["_shard_records"] = records
    atomic_write_json(root / MANIFEST_NAME, manifest)
    return manifest


def _remove_stale_shards(root: Path, split_items: dict[str, Sequence[Any]], records: list[dict]) -> None:
    """Delete shard/index files left by an earlier, larger run so the directory matches the manifest."""
    live = {rec["name"] for rec in records if rec["num_samples"]}
    live |= {index_name(name) for name in live}
    for split in split_items:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for path in split_dir.iterdir():
            rel = f"{split}/{path.name}"
            if path.suffix in (".tar", ".idx") and rel not in live:
                path.unlink()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))
