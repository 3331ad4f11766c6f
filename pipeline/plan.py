"""The sample plan: which samples each rank reads, in which order, for a given epoch.

Both backends read exactly this plan, which is what makes the loader deterministic, resumable and
backend-independent:

    dataset index   every shard's DALI `.idx` parsed once at start (member offsets and sizes), checked
                    against the manifest and, for the first and last sample, against the tar headers
                    (a stale index fails here); a missing shard or index, or a member name outside
                    `<key>.<ext>`, fails here with its path
    epoch order     with shuffle, a permutation of the whole split drawn from (seed, epoch), as G2D's
                    and MGCA's own loaders shuffle: every batch draws from many shards, so in-batch
                    contrastive negatives come from the whole corpus, not from one shard's ~2,000
                    samples. `data.shard_mix` = k > 0 permutes within windows of k shards instead
                    (shard order permuted first): each batch then draws from ~k shards, and a pass
                    holds only k shards open at a time (for storage where random reads across
                    the whole split are slow). Readers sort each batch's reads by shard and offset.
                    Without shuffle (evaluation): manifest order. The subset (if any) is applied here,
                    then `data.max_samples` (at most that many of the selected samples: those whose
                    keys hash lowest, so the pick depends on the keys alone, not on seed or order).
    rank blocks     the epoch order cut into `world_size` contiguous blocks. With drop_last every rank
                    gets floor(N / world / B) full batches - the same count on every rank, so no rank
                    waits at the epoch end in a collective the others never reach. Without drop_last
                    (evaluation) blocks differ by at most one sample and the last batch is partial.
    resume          state = (epoch, batches consumed); the plan is a pure function of the config, so
                    the remaining batches are simply `batches[consumed:]`.

Global sample ids number the samples shard-major in manifest order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.schema import (
    KEY_RE,
    MEMBER_ORDER,
    TAR_BLOCK,
    ManifestError,
    check_member_header,
    parse_dali_index,
    read_manifest,
    split_shards,
    stale_index_message,
)

EXT_COLUMN = {ext: i for i, ext in enumerate(MEMBER_ORDER)}  # jpg 0, txt 1, json 2, png 3
REQUIRED_MEMBERS = ("jpg", "txt", "json")


@dataclass
class ShardIndex:
    name: str  # relative to the dataset root, e.g. "train/train-000003.tar"
    path: str  # absolute tar path
    keys: list[str]
    offsets: np.ndarray  # [n, len(MEMBER_ORDER)] int64 data offset of each member, -1 = absent
    sizes: np.ndarray  # [n, len(MEMBER_ORDER)] int64 member sizes

    def __len__(self) -> int:
        return len(self.keys)


def parse_index(tar_path: str, idx_path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A shard's DALI index (shards.schema.parse_dali_index) as keys + [count, members] offsets/sizes."""
    try:
        text = Path(idx_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"index file missing: {idx_path} (belongs to {tar_path})") from None
    samples = parse_dali_index(text, idx_path)
    offsets = np.full((len(samples), len(MEMBER_ORDER)), -1, dtype=np.int64)
    sizes = np.zeros((len(samples), len(MEMBER_ORDER)), dtype=np.int64)
    keys = []
    for row, members in enumerate(samples):
        key = None
        for ext, off, size, member in members:
            stem, _, member_ext = member.partition(".")
            if not KEY_RE.match(stem) or member_ext != ext:
                # Keys name batches, errors and DALI's source_info; a name outside the pattern (a path,
                # a dot in the key) would be read as something else downstream.
                raise ManifestError(
                    f"{idx_path}:{row + 2}: member {member!r} of shard {tar_path} is not "
                    f"<key>.{ext} with a key of [A-Za-z0-9_-]"
                )
            if key is None:
                key = stem
            if stem != key or ext not in EXT_COLUMN:
                raise ManifestError(f"{idx_path}:{row + 2}: unexpected member {member!r}")
            offsets[row, EXT_COLUMN[ext]] = off
            sizes[row, EXT_COLUMN[ext]] = size
        keys.append(key)
    return keys, offsets, sizes


def check_headers(shard: ShardIndex, rows) -> None:
    """Check the tar headers of every member of `rows` against the index (name and size at the
    indexed offset): run on the first and last sample of each shard at start, a few small reads per
    shard, it catches an index left from another packing at once, with the right cause (reading on
    would report "txt: not UTF-8" or "json invalid" sample after sample). The readers check every
    sample they read the same way (pipeline/batch.py)."""
    with open(shard.path, "rb") as fh:
        for row in rows:
            for ext, col in EXT_COLUMN.items():
                offset, size = int(shard.offsets[row, col]), int(shard.sizes[row, col])
                if offset < 0:
                    continue
                fh.seek(max(0, offset - TAR_BLOCK))
                problem = check_member_header(
                    fh.read(TAR_BLOCK) if offset >= TAR_BLOCK else b"", f"{shard.keys[row]}.{ext}", size
                )
                if problem is not None:
                    raise ManifestError(stale_index_message(shard.name, problem))


class DatasetIndex:
    """Every sample of one split: where its members are, and which ones the config selects."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        subset: str | None = None,
        subset_task: str | None = None,
        need_masks: bool = False,
    ):
        self.root = Path(root)
        self.split = split
        manifest = read_manifest(self.root)
        self.manifest = manifest
        records = {rec["name"]: rec for rec in manifest.get("_shard_records", [])}
        self.shards: list[ShardIndex] = []
        for entry in split_shards(self.root, manifest, split):
            tar = Path(entry["path"])
            if not tar.is_file():
                raise ManifestError(f"shard missing: {tar} (named by {self.root / 'manifest.json'})")
            keys, offsets, sizes = parse_index(str(tar), entry["index_path"])
            if len(keys) != entry["num_samples"]:
                raise ManifestError(f"{entry['index_path']}: {len(keys)} samples, manifest says {entry['num_samples']}")
            rec = records.get(entry["name"])
            if rec is not None and rec.get("keys") is not None and rec["keys"] != keys:
                raise ManifestError(
                    f"{entry['index_path']}: keys differ from the manifest's record of {entry['name']} (stale index?)"
                )
            end = int((offsets + sizes).max())
            if end > tar.stat().st_size:
                raise ManifestError(f"{tar}: truncated ({tar.stat().st_size} bytes, index needs {end})")
            for ext in REQUIRED_MEMBERS + (("png",) if need_masks else ()):
                missing = np.flatnonzero(offsets[:, EXT_COLUMN[ext]] < 0)
                if missing.size:
                    hint = " (data.load_masks needs a dataset with masks)" if ext == "png" else ""
                    raise ManifestError(f"{tar}: sample {keys[missing[0]]} has no .{ext} member{hint}")
            shard = ShardIndex(entry["name"], str(tar), keys, offsets, sizes)
            check_headers(shard, (0, len(shard) - 1))
            self.shards.append(shard)
        if not self.shards:
            raise ManifestError(f"split {split!r} of {self.root} has no shards")
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_start = np.concatenate([[0], np.cumsum(lengths)])  # [S + 1] first global id
        self.num_samples = int(self.shard_start[-1])
        self.selected = self._subset_mask(subset, subset_task)  # [N] bool

    def _subset_mask(self, subset: str | None, task: str | None) -> np.ndarray:
        if subset is None:
            return np.ones(self.num_samples, dtype=bool)
        table = (
            self.manifest.get("task_subsets", {}).get(task, {})
            if task is not None
            else self.manifest.get("subsets", {})
        )
        where = f"manifest['task_subsets'][{task!r}]" if task is not None else "manifest['subsets']"
        fractions = table.get(self.split, {})
        if subset not in fractions:
            raise ManifestError(
                f"{self.root / 'manifest.json'}: no subset {subset!r} for split "
                f"{self.split!r} in {where}; have {sorted(fractions)}"
            )
        wanted = set(fractions[subset])
        mask = np.array([k in wanted for s in self.shards for k in s.keys], dtype=bool)
        if int(mask.sum()) != len(wanted):
            known = {k for s in self.shards for k in s.keys}
            raise ManifestError(
                f"subset {subset!r} of {self.split!r} names keys that are not in the "
                f"shards, e.g. {sorted(wanted - known)[:3]}"
            )
        return mask

    def cap(self, max_samples: int) -> None:
        """Keep at most `max_samples` of the selected samples: those whose keys' SHA-1 is lowest. The
        pick depends on the keys alone (not on the seed, the shard layout or the order), so every run,
        arm and backend over the split keeps the same samples."""
        gids = np.flatnonzero(self.selected)
        if gids.size <= max_samples:
            return
        digests = [hashlib.sha1(self.key(int(g)).encode("utf-8")).digest() for g in gids]
        keep = gids[sorted(range(gids.size), key=digests.__getitem__)[:max_samples]]
        self.selected = np.zeros_like(self.selected)
        self.selected[keep] = True

    def locate(self, gid: int) -> tuple[ShardIndex, int]:
        """(shard, row in shard) of a global sample id."""
        s = int(np.searchsorted(self.shard_start, gid, side="right")) - 1
        return self.shards[s], int(gid - self.shard_start[s])

    def shard_id(self, gids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.shard_start, gids, side="right") - 1

    def key(self, gid: int) -> str:
        shard, row = self.locate(gid)
        return shard.keys[row]

    @property
    def num_selected(self) -> int:
        return int(self.selected.sum())


def epoch_order(index: DatasetIndex, seed: int, epoch: int, shuffle: bool, shard_mix: int = 0) -> np.ndarray:
    """All selected global ids in this epoch's reading order: [N_selected] int64.

    shuffle: the shard order is permuted, then the samples of each window of `shard_mix` consecutive
    shards (0: all of them) are permuted together, so every batch draws from the whole window."""
    rng = np.random.default_rng([seed, epoch])
    if not shuffle:
        return np.flatnonzero(index.selected).astype(np.int64)
    shard_ids = rng.permutation(len(index.shards))
    window = shard_mix if shard_mix > 0 else len(shard_ids)
    parts = []
    for w in range(0, len(shard_ids), window):
        gids = [
            np.arange(index.shard_start[s], index.shard_start[s + 1], dtype=np.int64) for s in shard_ids[w : w + window]
        ]
        gids = np.concatenate(gids)
        parts.append(rng.permutation(gids[index.selected[gids]]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rank_block(n: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s contiguous block of the n-sample epoch order."""
    if drop_last:
        per_rank = (n // (world_size * batch_size)) * batch_size
        return rank * per_rank, (rank + 1) * per_rank
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def num_batches(n: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    start, stop = rank_block(n, rank, world_size, batch_size, drop_last)
    return -(-(stop - start) // batch_size)


@dataclass
class RankPlan:
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    batches: list[np.ndarray]  # per batch: [<= B] global ids, in reading order

    def __len__(self) -> int:
        return len(self.batches)


def make_plan(
    index: DatasetIndex,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    shard_mix: int = 0,
) -> RankPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    order = epoch_order(index, seed, epoch, shuffle, shard_mix)
    start, stop = rank_block(len(order), rank, world_size, batch_size, drop_last)
    block = order[start:stop]
    batches = [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    return RankPlan(epoch, rank, world_size, batch_size, batches)


@dataclass(frozen=True)
class PlanArgs:
    """Everything a rank's plan depends on besides the index and the epoch: what a worker process
    needs to compute the plan of any epoch itself."""

    seed: int
    rank: int
    world_size: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    shard_mix: int = 0

    def make(self, index: DatasetIndex, epoch: int) -> RankPlan:
        return make_plan(
            index,
            self.seed,
            epoch,
            self.rank,
            self.world_size,
            self.batch_size,
            self.shuffle,
            self.drop_last,
            self.shard_mix,
        )


def distinct_shards(index: DatasetIndex, plan: RankPlan) -> np.ndarray:
    """[batches] how many shards each batch of the plan draws from (the in-batch negatives' spread)."""
    return np.array([len(np.unique(index.shard_id(b))) for b in plan.batches], dtype=np.int64)
