"""Check a packed dataset against its manifest, shard by shard, in manifest order.

Per shard: the tar's size and sha256 match the manifest; the tar parses (read in memory, nothing
extracted); members come grouped per sample in MEMBER_ORDER with valid keys; every sample has its
jpg, txt and json; the json parses to an object and its `crc32` matches every member (damage inside
a JPEG's scan data decodes without complaint: only the checksum sees it); the jpg fully decodes; the
txt is UTF-8; the sample count matches; the `.idx` equals the index rebuilt from the tar's own
headers. When the size or sha256 is wrong the tar is still read, so that the message names the
damaged sample (`sample <key>: jpg: crc32 mismatch`) and not only the shard.
Per dataset: split and total counts match, no key appears twice, and `counts` (when present) add up.
The first failure (in manifest order) raises `ShardError` naming the shard and the problem.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from shards.schema import (
    KEY_RE,
    MEMBER_ORDER,
    IndexEntry,
    ManifestError,
    check_member_crcs,
    format_dali_index,
    read_manifest,
    split_shards,
)

REQUIRED_MEMBERS = ("jpg", "txt", "json")


class ShardError(RuntimeError):
    """A shard (named first in the message) does not match its manifest or is unreadable."""


@dataclass
class ShardCheck:
    name: str
    error: str  # "" when the shard is fine
    keys: list[str]


def _check_sample(key: str, members: dict[str, bytes]) -> str:
    missing = [ext for ext in REQUIRED_MEMBERS if ext not in members]
    if missing:
        return f"sample {key}: missing member(s) {missing}"
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"sample {key}: json does not parse ({exc})"
    if not isinstance(meta, dict):
        return f"sample {key}: json is not an object"
    crc_problem = check_member_crcs(meta, {ext: data for ext, data in members.items() if ext != "json"})
    if crc_problem:
        return f"sample {key}: {crc_problem}"
    try:
        with Image.open(io.BytesIO(members["jpg"])) as img:
            img.load()
    except Exception as exc:  # any decoder failure is a bad sample, reported with its type
        return f"sample {key}: jpg does not decode ({type(exc).__name__}: {exc})"
    if "png" in members:
        try:
            with Image.open(io.BytesIO(members["png"])) as img:
                img.load()
        except Exception as exc:
            return f"sample {key}: png does not decode ({type(exc).__name__}: {exc})"
    try:
        members["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"sample {key}: txt is not UTF-8 ({exc.reason} at byte {exc.start})"
    return ""


def check_shard(tar_path: str, idx_path: str, expected: dict) -> ShardCheck:
    """Check one shard file against its manifest entry `expected`."""
    name = expected["name"]
    path = Path(tar_path)
    if not path.is_file():
        return ShardCheck(name, "file missing", [])
    data = path.read_bytes()
    whole_file = ""
    if len(data) != expected["bytes"]:
        whole_file = f"size {len(data)} bytes, manifest says {expected['bytes']}"
    else:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected["sha256"]:
            whole_file = f"sha256 {digest[:16]}... does not match the manifest's {expected['sha256'][:16]}..."
    check = _check_members(name, data, idx_path, expected)
    if whole_file:
        # The members' own checks usually say which sample is damaged; the file-level one says less.
        return ShardCheck(name, f"{check.error} ({whole_file})" if check.error else whole_file, check.keys)
    return check


def _check_members(name: str, data: bytes, idx_path: str, expected: dict) -> ShardCheck:
    """Parse the tar `data` and check every sample, the count and the index (see module docstring)."""
    keys: list[str] = []
    samples: list[tuple[str, dict[str, bytes]]] = []
    index_rows: list[list[IndexEntry]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    return ShardCheck(name, f"member {member.name!r} is not a regular file", keys)
                key, dot, ext = member.name.partition(".")
                if not dot or not KEY_RE.match(key) or ext not in MEMBER_ORDER:
                    return ShardCheck(name, f"unexpected member name {member.name!r}", keys)
                if not samples or samples[-1][0] != key:
                    if key in keys:
                        return ShardCheck(name, f"sample {key}: members not contiguous", keys)
                    keys.append(key)
                    samples.append((key, {}))
                    index_rows.append([])
                members = samples[-1][1]
                if ext in members or any(MEMBER_ORDER.index(e) > MEMBER_ORDER.index(ext) for e in members):
                    return ShardCheck(name, f"sample {key}: member {ext} repeated or out of order", keys)
                members[ext] = tar.extractfile(member).read()
                index_rows[-1].append((ext, member.offset_data, member.size, member.name))
    except (tarfile.TarError, EOFError, OSError) as exc:
        return ShardCheck(name, f"tar does not parse ({type(exc).__name__}: {exc})", keys)
    for key, members in samples:
        problem = _check_sample(key, members)
        if problem:
            return ShardCheck(name, problem, keys)
    if len(samples) != expected["num_samples"]:
        return ShardCheck(name, f"{len(samples)} samples, manifest says {expected['num_samples']}", keys)
    idx = Path(idx_path)
    if not idx.is_file():
        return ShardCheck(name, f"index {idx.name} missing", keys)
    want = format_dali_index(index_rows)
    if idx.read_bytes() != want.encode("utf-8"):
        return ShardCheck(name, f"index {idx.name} does not match the tar's members", keys)
    return ShardCheck(name, "", keys)


def _check_job(args: tuple[str, str, dict]) -> ShardCheck:
    return check_shard(*args)


# Fields of a manifest that verification reads, with their types (a hand-edited or foreign
# manifest fails here naming the field, not with a KeyError inside a worker).
_SHARD_FIELDS = {"name": str, "num_samples": int, "bytes": int, "sha256": str}


def _check_manifest_shape(root: Path, manifest: dict) -> None:
    where = root / "manifest.json"
    if (
        not isinstance(manifest.get("num_samples"), int)
        or not isinstance(manifest.get("rejected", []), list)
        or not isinstance(manifest["splits"], dict)
    ):
        raise ManifestError(f"{where}: num_samples, splits or rejected has the wrong type")
    for split, rec in manifest["splits"].items():
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("num_samples"), int)
            or not isinstance(rec.get("shards"), list)
        ):
            raise ManifestError(f"{where}: split {split!r} needs num_samples (int) and shards (list)")
        for i, entry in enumerate(rec["shards"]):
            bad = [
                f
                for f, kind in _SHARD_FIELDS.items()
                if not isinstance(entry, dict) or not isinstance(entry.get(f), kind)
            ]
            if bad:
                raise ManifestError(f"{where}: split {split!r} shard {i}: field(s) {bad} missing or of the wrong type")


def verify_dataset(root: str | Path, workers: int = 1) -> dict:
    """Verify every shard under `root`; raise ShardError (first bad shard) or ManifestError.
    Returns a summary {"num_samples", "bytes", "splits": {split: {"shards", "num_samples"}}}."""
    root = Path(root)
    manifest = read_manifest(root)
    _check_manifest_shape(root, manifest)
    jobs: list[tuple[str, str, dict]] = []
    for split in manifest["splits"]:
        for entry in split_shards(root, manifest, split):
            jobs.append((entry["path"], entry["index_path"], entry))
    # A bar with an ETA (stderr; tqdm hides it when stderr is not a terminal): a full MIMIC check
    # reads every byte of ~400 GB.
    bar = dict(total=len(jobs), unit="shard", desc=f"verifying {root.name}", disable=None)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_check_job, jobs), **bar))
    else:
        results = [_check_job(job) for job in tqdm(jobs, **bar)]
    by_name = {}
    for res in results:  # manifest order: the first failure reported is the first bad shard
        if res.error:
            raise ShardError(f"{res.name}: {res.error}")
        by_name[res.name] = res

    summary: dict = {"num_samples": 0, "bytes": 0, "splits": {}}
    seen: dict[str, str] = {}
    for split, rec in manifest["splits"].items():
        total = 0
        for entry in rec["shards"]:
            for key in by_name[entry["name"]].keys:
                if key in seen:
                    raise ShardError(f"{entry['name']}: key {key} also in {seen[key]}")
                seen[key] = entry["name"]
            total += entry["num_samples"]
            summary["bytes"] += entry["bytes"]
        if total != rec["num_samples"]:
            raise ManifestError(f"split {split}: shards hold {total} samples, manifest says {rec['num_samples']}")
        summary["splits"][split] = {"shards": len(rec["shards"]), "num_samples": total}
        summary["num_samples"] += total
    if summary["num_samples"] != manifest["num_samples"]:
        raise ManifestError(f"shards hold {summary['num_samples']} samples, manifest says {manifest['num_samples']}")
    counts = manifest.get("counts")
    if counts:
        if counts["packed"] != summary["num_samples"] or counts["rejected"] != len(manifest["rejected"]):
            raise ManifestError(f"manifest counts {counts} disagree with its shards/rejected list")
        if counts["packed"] + counts["rejected"] + counts["filtered"] != counts["input_rows"]:
            raise ManifestError(f"manifest counts do not add up: {counts}")
    return summary
