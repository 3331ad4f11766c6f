"""Streaming shards from object storage: `data.shards` as a URL spec, read once front to back.

    data.shards: https://host/mimic/train/train-{000000..000099}.tar     one split's tars (brace-expanded,
                 "pipe:aws s3 cp s3://bucket/mimic/train/train-{000000..000099}.tar -"   `::` joins lists,
                 s3://bucket/mimic/train/train-{000000..000099}.tar  (fsspec)   as webdataset/open_clip)
                 https://host/mimic                                   the dataset root: every split

The manifest is fetched from the dataset root beside the tars: the parent of their directory when
that directory is named after their split (the layout `make shards` writes, shards/schema.py), else
their own directory; for `pipe:` the same command with the tar argument swapped for the manifest's
path. `data.manifest` overrides it. The tars must be ones the manifest lists; the loader's `split`
argument reads the listed tars when it is their split, and the split's shards from the manifest
(located beside them, same scheme or command) otherwise, so validation on "valid" works with a train
URL list. docs/streaming.md has the guarantees and the costs.

The plan (`make_stream_plan`, a pure function of the manifest, the config, the epoch and the rank):

    shard order     a permutation of the listed shards from (seed, epoch) (manifest order without
                    shuffle); their selected samples, shard-major in file order, form the epoch
    rank blocks     that sequence cut by `plan.rank_block`, exactly as the local plan: disjoint, the
                    same number of full batches on every rank with drop_last (a block may start or
                    end inside a shard: that shard is read by both ranks, each keeping its part)
    lanes           the rank's batch j belongs to lane j % stream_lanes; each lane takes the next
                    contiguous run of the rank's block and reads its shards `shard_mix` (0: 4) at a
                    time, round-robin, through a shuffle buffer of `stream_buffer` samples seeded by
                    (seed, epoch, rank, lane): each batch mixes ~shard_mix shards
    workers         DataLoader worker w builds batches w, w + W, ... as in the torch backend, so it
                    owns whole lanes when W divides stream_lanes: the loader uses the largest such W
                    <= num_workers, and the batches are then the same for any num_workers

Since the arrival order of every sample is known in advance, the plan lists each batch's global ids
(like the local RankPlan), and resume is exact: after `load_state_dict` the lanes skip the consumed
batches; a shard none of whose remaining samples is needed is not opened, a partly consumed one is
streamed from its start with the consumed samples' bytes discarded undecoded.

Samples are parsed with Python's tarfile in streaming mode (`r|`: members read in memory, never
extracted), checked against the manifest's keys (another packing is a ManifestError) and by the same
CRC checks, image-header bounds and per-sample decode/geometry/tokenisation as local reads
(`EpochBatches.build`). A bad sample is recorded and skipped like a local one; a stream that breaks is
re-opened `RETRIES` times (re-streamed up to where it broke), then fails naming the URL.

The local loader's bounds hold here too: a manifest entry that leaves the dataset root ("../x.tar", an
absolute path) is refused with the local loader's message; a tar header declaring a member (or a pax /
long-name header) over `MAX_MEMBER_BYTES` fails naming shard and member before anything is read into
memory; an http(s) or pipe: transfer that has not finished after `data.stream_deadline_s` (a server
trickling bytes, each read within the 60 s read timeout) counts as a broken stream: retried, then an
error naming the URL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import select
import shlex
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPException
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np
from torch.utils.data import get_worker_info

from common.cli import UserError
from common.config import ConfigError
from pipeline.batch import BackendOptions, HostBatch, LoaderStats
from pipeline.config import DataConfig
from pipeline.plan import DatasetIndex, PlanArgs, RankPlan, rank_block
from pipeline.text import BatchTokenizer
from pipeline.torch_backend import EpochBatches, TorchBackend, TorchBatches
from shards.schema import FORMAT_VERSION, KEY_RE, MANIFEST_NAME, MEMBER_ORDER, ManifestError

RETRIES = 2  # re-opens of a stream that broke (network), each re-streaming up to where it broke
RETRY_DELAY_S = 0.5  # doubled per retry
TIMEOUT_S = 60.0  # connect / read timeout of an http(s) request (one read; the transfer: Deadline)
DEADLINE_S = DataConfig.stream_deadline_s  # the default of open_url / fetch callers without a config
# A stored member is a reduced image (a 4096-px max_side JPEG or PNG is < 20 MB), a report or a json:
# a header declaring more is damage or an attack, and tarfile would read it all into memory.
MAX_MEMBER_BYTES = 64 * 2**20
DEFAULT_MIX = 4  # shards each lane reads at once when data.shard_mix is 0
FSSPEC_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# What a broken transfer raises: sockets and files (OSError, urllib's URLError), http.client (a short
# body), tarfile (a member cut short).
STREAM_ERRORS = (OSError, HTTPException, tarfile.ReadError, EOFError)


class RemoteShardError(UserError, RuntimeError):
    """A URL could not be read (unreachable, HTTP error, command failed, stream cut short)."""


class TransferTimeout(TimeoutError):
    """A transfer outlived its deadline (an OSError: a broken stream, retried like one)."""


class Deadline:
    """The end of one transfer: `left()` is the time remaining, and raises `TransferTimeout` once none is."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise self.timeout()
        return remaining

    def timeout(self) -> TransferTimeout:
        return TransferTimeout(f"transfer not finished after {self.seconds:g} s (data.stream_deadline_s)")


class MemberTooLarge(ManifestError):
    """A tar header declares a member over MAX_MEMBER_BYTES (raised before its bytes are read)."""


def check_member_size(info: tarfile.TarInfo) -> tarfile.TarInfo:
    if info.size > MAX_MEMBER_BYTES:
        raise MemberTooLarge(
            f"member {info.name!r} declares {info.size} bytes, over the {MAX_MEMBER_BYTES // 2**20} MiB "
            "a stored member may have (a damaged or hostile tar)"
        )
    return info


class CappedTarInfo(tarfile.TarInfo):
    """tarfile's header parser with the size cap checked on every header block as it is parsed, so
    neither a member nor a pax / GNU long-name header (which tarfile reads whole before yielding the
    member) is read into memory when it claims more than MAX_MEMBER_BYTES. (A pax record can still
    raise the next member's size: `ShardStream` checks each member again before reading it.)"""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        return check_member_size(super().frombuf(buf, encoding, errors))


# ---- opening URLs ---------------------------------------------------------------------------------


class PipeStream:
    """stdout of a `pipe:` command, run from its shlex-split argv without a shell. EOF with a non-zero
    exit status is an error (with the command's last stderr line); closing early ends the command."""

    def __init__(self, url: str, deadline: Deadline):
        self.url, self.deadline = url, deadline
        argv = shlex.split(url[len("pipe:") :])
        if not argv:
            raise RemoteShardError(f"{url}: empty command")
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block
        try:
            # Unbuffered: each read is one os.read, so the deadline is checked while a slow command writes.
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, bufsize=0
            )
        except OSError as exc:
            self._stderr.close()
            raise RemoteShardError(f"{url}: cannot run {argv[0]!r} ({exc.strerror or exc})") from None

    def _read_some(self, size: int) -> bytes:
        """Up to `size` bytes, as soon as the command has written any (b"" at its end)."""
        if not select.select([self.proc.stdout], [], [], self.deadline.left())[0]:
            raise self.deadline.timeout()  # the command wrote nothing more before the deadline
        return self.proc.stdout.read(size)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            chunks = iter(lambda: self._read_some(2**20), b"")
            data = b"".join(chunks)
        else:
            data = self._read_some(size) if size else b""
        if not data and size != 0:
            status = self.proc.wait()
            if status != 0:
                self._stderr.seek(0)
                lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise RemoteShardError(f"{self.url}: exit status {status}" + (f": {lines[-1]}" if lines else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # stopped early (rank/lane boundary, resume): the rest is not needed
        self.proc.stdout.close()
        self.proc.wait()
        self._stderr.close()


class HttpStream:
    """An http(s) response body that raises when it ends before its Content-Length (http.client
    returns a short read silently, and a tar cut at a member boundary would look complete) or outlives
    its deadline: `read1` returns after one socket read, so a server trickling a byte at a time (each
    read well within TIMEOUT_S) meets the deadline check between reads."""

    def __init__(self, url: str, response, deadline: Deadline):
        self.url, self.response, self.deadline = url, response, deadline
        length = response.headers.get("Content-Length", "")
        self.remaining = int(length) if length.isdigit() else None

    def _read_some(self, size: int) -> bytes:
        self.deadline.left()
        return self.response.read1(size)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            data = b"".join(iter(lambda: self._read_some(2**20), b""))
        else:
            parts, want = [], size
            while want > 0:  # a full read, as the caller asked (tarfile needs whole header blocks)
                part = self._read_some(want)
                if not part:
                    break
                parts.append(part)
                want -= len(part)
            data = b"".join(parts)
        if self.remaining is not None:
            self.remaining -= len(data)
            if not data and size != 0 and self.remaining > 0:
                raise ConnectionError(f"connection closed {self.remaining} bytes before the end")
        return data

    def close(self) -> None:
        self.response.close()


def open_url(url: str, deadline_s: float = DEADLINE_S):
    """A binary stream of `url`: pipe: command, http(s) (urllib), file://, else fsspec (s3://, gs://).
    An http(s) or pipe: transfer raises `TransferTimeout` once it has taken `deadline_s` (file:// is
    local; fsspec has its own timeouts)."""
    deadline = Deadline(deadline_s)
    if url.startswith("pipe:"):
        return PipeStream(url, deadline)
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        try:
            response = urllib.request.urlopen(url, timeout=min(TIMEOUT_S, deadline.left()))
            return HttpStream(url, response, deadline)
        except urllib.error.HTTPError as exc:
            raise RemoteShardError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RemoteShardError(f"{url}: unreachable ({getattr(exc, 'reason', exc)})") from None
    if scheme == "file":
        try:
            return open(url2pathname(urlparse(url).path), "rb")
        except OSError as exc:
            raise RemoteShardError(f"{url}: {exc.strerror or exc}") from None
    package = FSSPEC_PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
    try:
        import fsspec
    except ImportError:
        raise RemoteShardError(
            f"{url}: {scheme}:// shards need fsspec and {package} (pip install fsspec {package})"
        ) from None
    try:
        return fsspec.open(url, "rb").open()
    except ImportError:
        raise RemoteShardError(f"{url}: {scheme}:// shards need {package} (pip install {package})") from None
    except (OSError, ValueError) as exc:
        raise RemoteShardError(f"{url}: {exc}") from None


def fetch(url: str, deadline_s: float = DEADLINE_S) -> bytes:
    stream = open_url(url, deadline_s)
    try:
        return stream.read()
    except STREAM_ERRORS as exc:
        raise RemoteShardError(f"{url}: transfer failed ({exc})") from None
    finally:
        stream.close()


@dataclass(frozen=True)
class Locator:
    """Turns a name relative to the dataset root into something `open_url` reads: `<root>/<name>`, or
    for a pipe: command the command with its path argument (argv[token]) set to that."""

    root: str
    argv: tuple[str, ...] | None = None
    token: int = 0

    def url(self, name: str) -> str:
        path = f"{self.root}/{name}"
        if self.argv is None:
            return path
        return "pipe:" + shlex.join(self.argv[: self.token] + (path,) + self.argv[self.token + 1 :])

    def __truediv__(self, name: str) -> str:  # `index.root / shard`, as the local loader's messages write
        return self.url(name)

    def __str__(self) -> str:
        return self.root


def locate_tar(url: str) -> tuple[Locator, str]:
    """(dataset root, name relative to it) of one tar URL (module docstring)."""
    argv, token, path = None, 0, url
    if url.startswith("pipe:"):
        argv = tuple(shlex.split(url[len("pipe:") :]))
        hits = [i for i, arg in enumerate(argv) if arg.endswith(".tar")]
        if len(hits) != 1:
            raise ConfigError(
                f"{url}: cannot find the manifest beside it: the command needs exactly one argument "
                "ending in .tar (the shard), or set data.manifest"
            )
        token, path = hits[0], argv[hits[0]]
    if not path.endswith(".tar"):
        raise ConfigError(f"data.shards: {url} is not a .tar URL (give one split's tars, or the dataset root)")
    parent, _, base = path.rpartition("/")
    split = base[: base.rfind("-")] if "-" in base else None
    grand, _, folder = parent.rpartition("/")
    if split and folder == split and grand:  # <root>/<split>/<split>-NNNNNN.tar
        return Locator(grand, argv, token), f"{split}/{base}"
    return Locator(parent, argv, token), base


# ---- the index ------------------------------------------------------------------------------------


def check_inside_root(root: Locator, name: str, split: str, manifest_url: str) -> None:
    """Refuse a manifest entry that leaves the dataset root ("../", an absolute path, or either spelled
    with %-escapes that a server decodes), as the local loader refuses it (shards.schema.split_shards):
    a manifest must not turn any file the URL's scheme or command can reach into training data."""
    plain = unquote(name).replace("\\", "/")
    inside = posixpath.normpath(posixpath.join("/root", plain))
    absolute = plain.startswith("/") or "://" in plain
    if absolute or not inside.startswith("/root/"):
        scheme, sep, path = str(root).rpartition("://")
        resolved = plain if absolute else scheme + sep + posixpath.normpath(f"{path}/{plain}")
        raise ManifestError(
            f"{manifest_url}: split {split!r} names {name!r}, which resolves to {resolved}, outside the shard "
            f"root {root}"
        )


@dataclass
class StreamShard:
    name: str  # relative to the dataset root, as the manifest names it
    url: str
    num_samples: int
    keys: list[str] | dict[int, str]  # the manifest's record, else filled as samples arrive

    def __len__(self) -> int:
        return self.num_samples


def load_manifest(url: str, deadline_s: float = DEADLINE_S) -> dict:
    data = fetch(url, deadline_s)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise ManifestError(f"{url}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "splits" not in manifest:
        raise ManifestError(f"{url}: not a {FORMAT_VERSION} manifest")
    return manifest


class StreamIndex:
    """The shards of one split named by a URL spec, with what the manifest says about them: the
    interface of `plan.DatasetIndex` that the plan, the loader and `EpochBatches.build` use."""

    def __init__(
        self,
        spec: str,
        split: str,
        manifest_url: str | None = None,
        subset=None,
        subset_task=None,
        deadline_s: float = DEADLINE_S,
    ):
        from webdataset.shardlists import expand_urls  # braces and `::` exactly as webdataset expands them

        self.split, self.deadline_s = split, deadline_s
        urls = expand_urls(spec)
        if len(urls) == 1 and not urls[0].endswith(".tar") and not urls[0].startswith("pipe:"):
            locator, listed = Locator(urls[0].rstrip("/")), None  # the dataset root
        else:
            located = [locate_tar(u) for u in urls]
            locator, listed = located[0][0], dict(zip(urls, (rel for _, rel in located)))
        self.root = locator
        self.manifest_url = manifest_url or locator.url(MANIFEST_NAME)
        self.manifest = manifest = load_manifest(self.manifest_url, deadline_s)
        splits = manifest["splits"]
        for entry in splits.get(split, {}).get("shards", []):
            check_inside_root(locator, entry["name"], split, self.manifest_url)
        where = {}  # name (and, for a flat layout, base name) -> (split, entry)
        for name, part in splits.items():
            for entry in part["shards"]:
                where[entry["name"]] = (name, entry)
                where.setdefault(entry["name"].rpartition("/")[2], (name, entry))  # tars listed flat
        chosen: list[tuple[dict, str]] = []  # (manifest entry, url)
        if listed is not None:
            found = {}
            for url, rel in listed.items():
                if rel not in where:
                    raise ManifestError(f"{url}: not a shard {self.manifest_url} lists (looked for {rel!r})")
                found[url] = where[rel]
            listed_splits = sorted({s for s, _ in found.values()})
            if len(listed_splits) > 1:
                raise ConfigError(f"data.shards names shards of several splits {listed_splits}; give one split's")
            if len({e["name"] for _, e in found.values()}) != len(found):
                raise ConfigError("data.shards names a shard twice")
            if listed_splits[0] == split:
                chosen = [(entry, url) for url, (_, entry) in found.items()]
        if not chosen:
            if split not in splits:
                raise ManifestError(f"split {split!r} not in {self.manifest_url}; have {sorted(splits)}")
            chosen = [(entry, locator.url(entry["name"])) for entry in splits[split]["shards"]]
        order = {entry["name"]: i for i, entry in enumerate(splits.get(split, {}).get("shards", []))}
        chosen.sort(key=lambda item: order.get(item[0]["name"], 0))  # global ids in manifest order
        records = {rec["name"]: rec for rec in manifest.get("_shard_records", []) if isinstance(rec, dict)}
        self.shards: list[StreamShard] = []
        for entry, url in chosen:
            keys = records.get(entry["name"], {}).get("keys")
            if not isinstance(keys, list) or len(keys) != entry["num_samples"]:
                keys = {}
            self.shards.append(StreamShard(entry["name"], url, int(entry["num_samples"]), keys))
        if not self.shards:
            raise ManifestError(f"split {split!r} of {self.manifest_url} has no shards")
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_start = np.concatenate([[0], np.cumsum(lengths)])  # [S + 1] first global id
        self.num_samples = int(self.shard_start[-1])
        self.position = {s.name: i for i, s in enumerate(self.shards)}  # name -> shard id
        if subset is not None and any(isinstance(s.keys, dict) for s in self.shards):
            raise ManifestError(f"{self.manifest_url}: data.subset needs the shards' key lists (_shard_records)")
        self.selected = self._subset_mask(subset, subset_task)  # [N] bool

    # The same lookups as the local index (same arrays, same meaning).
    _subset_mask = DatasetIndex._subset_mask
    locate = DatasetIndex.locate
    shard_id = DatasetIndex.shard_id
    key = DatasetIndex.key
    num_selected = DatasetIndex.num_selected

    def cap(self, max_samples: int) -> None:
        if any(isinstance(s.keys, dict) for s in self.shards):
            raise ManifestError(f"{self.manifest_url}: data.max_samples needs the shards' key lists (_shard_records)")
        DatasetIndex.cap(self, max_samples)

    def fingerprint(self) -> str:
        """Which shards, in which order (the plan depends on it)."""
        return hashlib.sha256("\n".join(s.name for s in self.shards).encode()).hexdigest()[:16]


# ---- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamArgs(PlanArgs):
    """The local plan's arguments (`shard_mix`: shards each lane reads at once) and the lanes'."""

    lanes: int = 8
    buffer: int = 1000  # shuffle buffer, samples per lane

    def make(self, index: StreamIndex, epoch: int) -> StreamPlan:
        return make_stream_plan(index, self, epoch)


@dataclass
class Lane:
    arrivals: np.ndarray  # [n] global ids in the order the lane reads them
    batches: list[int]  # the rank's batch numbers this lane builds, in order


@dataclass
class StreamPlan(RankPlan):
    lanes: list[Lane] = field(default_factory=list)


def interleave(runs: list[np.ndarray], k: int) -> np.ndarray:
    """Round-robin over `k` runs at a time; a finished run's place goes to the next run (at the back)."""
    if not runs:
        return np.zeros(0, dtype=np.int64)
    active, rest, out = deque((run, 0) for run in runs[:k]), iter(runs[k:]), []
    while active:
        run, pos = active.popleft()
        out.append(run[pos])
        if pos + 1 < len(run):
            active.append((run, pos + 1))
        else:
            following = next(rest, None)
            if following is not None:
                active.append((following, 0))
    return np.asarray(out, dtype=np.int64)


def shuffle_buffer(items: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """webdataset's shuffle: fill a buffer of `size`, then emit a random element per arrival; the rest
    shuffled at the end."""
    draws = rng.random(len(items))
    buf, out = [], []
    for item, u in zip(items.tolist(), draws.tolist()):
        buf.append(item)
        if len(buf) >= size:
            i = int(u * len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            out.append(buf.pop())
    rng.shuffle(buf)
    return np.asarray(out + buf, dtype=np.int64)


def make_stream_plan(index: StreamIndex, args: StreamArgs, epoch: int) -> StreamPlan:
    if not 0 <= args.rank < args.world_size:
        raise ValueError(f"rank {args.rank} outside world size {args.world_size}")
    rng = np.random.default_rng([args.seed, epoch])
    shard_order = rng.permutation(len(index.shards)) if args.shuffle else np.arange(len(index.shards))
    seq = np.concatenate(
        [np.arange(index.shard_start[s], index.shard_start[s + 1], dtype=np.int64) for s in shard_order]
    )
    seq = seq[index.selected[seq]]
    start, stop = rank_block(len(seq), args.rank, args.world_size, args.batch_size, args.drop_last)
    block = seq[start:stop]
    sizes = [min(args.batch_size, len(block) - i) for i in range(0, len(block), args.batch_size)]
    batches: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(sizes)
    lanes, pos = [], 0
    for lane in range(args.lanes):
        mine = list(range(lane, len(sizes), args.lanes))
        chunk = block[pos : pos + sum(sizes[j] for j in mine)]
        pos += len(chunk)
        if args.shuffle:
            cuts = np.flatnonzero(np.diff(index.shard_id(chunk))) + 1  # runs of one shard
            arrivals = interleave(np.split(chunk, cuts) if len(chunk) else [], args.shard_mix)
            order = shuffle_buffer(arrivals, args.buffer, np.random.default_rng([args.seed, epoch, args.rank, lane]))
        else:
            arrivals = order = chunk
        at = 0
        for j in mine:
            batches[j] = order[at : at + sizes[j]]
            at += sizes[j]
        lanes.append(Lane(arrivals, mine))
    return StreamPlan(epoch, args.rank, args.world_size, args.batch_size, batches, lanes)


# ---- reading --------------------------------------------------------------------------------------


class ShardStream:
    """One shard read front to back: `take(row)` returns row's members (ext -> bytes), discarding the
    rows before it (read, not decoded). Members are checked later, in `EpochBatches.build` (CRCs,
    decode): a damaged one is a bad sample there, as in a local read."""

    def __init__(self, shard: StreamShard, manifest_url: str, deadline_s: float = DEADLINE_S):
        self.shard, self.manifest_url, self.deadline_s = shard, manifest_url, deadline_s
        self.next_row = 0
        self._samples = None

    def _read(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        stream = open_url(self.shard.url, self.deadline_s)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=CappedTarInfo)
            key, members = None, {}
            for info in tar:
                tar.members = []  # streaming mode keeps every header otherwise
                if not info.isfile():
                    continue
                check_member_size(info)
                stem, _, ext = info.name.partition(".")
                if not KEY_RE.match(stem) or ext not in MEMBER_ORDER:
                    raise ManifestError(
                        f"{self.shard.url}: member {info.name!r} is not <key>.<ext> with ext in {MEMBER_ORDER}"
                    )
                if stem != key:
                    if key is not None:
                        yield key, members
                    key, members = stem, {}
                members[ext] = tar.extractfile(info).read()  # in memory, never extracted
            if key is not None:
                yield key, members
        except MemberTooLarge as exc:
            raise MemberTooLarge(f"{self.shard.url}: {exc}") from None
        finally:
            stream.close()

    def _next(self) -> tuple[str, dict[str, bytes]]:
        for attempt in range(RETRIES + 1):
            try:
                if self._samples is None:
                    self._samples = self._read()
                    for _ in range(self.next_row):  # re-streaming after a break: skip what was read
                        next(self._samples)
                return next(self._samples)
            except StopIteration:  # fewer samples than listed: cut short, or another packing
                problem = (
                    f"stream ended after {self.next_row} of the {self.shard.num_samples} samples "
                    f"{self.manifest_url} lists (truncated?)"
                )
            except (RemoteShardError, *STREAM_ERRORS) as exc:
                problem = f"stream broke at sample {self.next_row} of {self.shard.num_samples} ({exc})"
            self.close()
            if attempt < RETRIES:
                time.sleep(RETRY_DELAY_S * 2**attempt)
        raise RemoteShardError(f"{self.shard.url}: {problem}; {RETRIES} retries failed")

    def take(self, row: int) -> dict[str, bytes]:
        while True:
            key, members = self._next()
            current, self.next_row = self.next_row, self.next_row + 1
            expected = self.shard.keys[current] if isinstance(self.shard.keys, list) else None
            if expected is not None and key != expected:
                raise ManifestError(
                    f"{self.shard.url}: sample {current} is {key!r} where {self.manifest_url} lists "
                    f"{expected!r}: the manifest belongs to another packing of this shard"
                )
            if isinstance(self.shard.keys, dict):
                self.shard.keys[current] = key
            if current == row:
                break
        if row == self.shard.num_samples - 1:  # the last sample: the tar must end here
            try:
                extra = next(self._samples, None)
            except STREAM_ERRORS as exc:
                raise RemoteShardError(f"{self.shard.url}: stream broke after its last sample ({exc})") from None
            if extra is not None:
                raise ManifestError(
                    f"{self.shard.url}: more samples than the {self.shard.num_samples} {self.manifest_url} lists"
                )
        return members

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()
            self._samples = None


class MemoryReader:
    """`SampleReader.read_row` over the members a lane has streamed for the batch being built. A missing
    member is fatal, as the local index makes it before the first read (a packing without masks, say)."""

    def __init__(self, index: StreamIndex):
        self.index = index
        self.samples: dict[int, dict[str, bytes]] = {}  # gid -> members

    def read_row(self, shard: StreamShard, row: int, exts: tuple[str, ...]) -> dict[str, bytes]:
        gid = int(self.index.shard_start[self.index.position[shard.name]]) + row
        members = self.samples[gid]
        missing = [ext for ext in exts if ext not in members]
        if missing:
            hint = " (data.load_masks needs a dataset with masks)" if missing[0] == "png" else ""
            raise ManifestError(f"{shard.url}: sample {shard.keys[row]} has no .{missing[0]} member{hint}")
        return {ext: members[ext] for ext in exts}


@dataclass
class StreamFailure:
    """A fatal error in a worker, re-raised by the loader process with its one-line message."""

    kind: str  # "manifest" | "remote"
    message: str


class StreamBatches(EpochBatches):
    """`EpochBatches` whose samples come from the lanes' streams instead of pread; building a batch is
    the inherited `build` (checks, decode, geometry, tokenisation)."""

    def _lane(self, plan: StreamPlan, lane: Lane, first: int) -> Iterator[tuple[int, dict]]:
        """(batch number, gid -> members) for the lane's batches >= first, in order."""
        wanted = [(j, plan.batches[j].tolist()) for j in lane.batches if j >= first]
        needed = {g for _, gids in wanted for g in gids}
        got: dict[int, dict[str, bytes]] = {}
        streams: dict[int, ShardStream] = {}
        last_row: dict[int, int] = {}
        for g in needed:
            sid = int(self.index.shard_id(g))
            last_row[sid] = max(last_row.get(sid, -1), g - int(self.index.shard_start[sid]))
        arrivals = iter(lane.arrivals.tolist())
        try:
            for j, gids in wanted:
                while any(g not in got for g in gids):
                    g = next(arrivals)
                    if g not in needed:
                        continue  # consumed before a resume: its shard need not even be opened
                    sid = int(self.index.shard_id(g))
                    shard, row = self.index.shards[sid], g - int(self.index.shard_start[sid])
                    if sid not in streams:
                        streams[sid] = ShardStream(shard, self.index.manifest_url, self.index.deadline_s)
                    got[g] = streams[sid].take(row)
                    if row == last_row[sid]:
                        streams.pop(sid).close()
                yield j, {g: got.pop(g) for g in gids}
        finally:
            for stream in streams.values():
                stream.close()

    def __iter__(self) -> Iterator[HostBatch | StreamFailure]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, first = self.position.tolist()
        plan = self.plan_args.make(self.index, epoch)
        reader, lanes = MemoryReader(self.index), {}
        try:
            for j in range(first + worker, len(plan), workers):
                lane = j % self.plan_args.lanes
                if lane not in lanes:
                    lanes[lane] = self._lane(plan, plan.lanes[lane], first)
                built, reader.samples = next(lanes[lane])
                if built != j:
                    raise RuntimeError(f"lane {lane} built batch {built}, expected {j} (workers must divide lanes)")
                yield self.build(plan, j, reader)
        except ManifestError as exc:
            yield StreamFailure("manifest", str(exc))
        except RemoteShardError as exc:
            yield StreamFailure("remote", str(exc))
        finally:
            for it in lanes.values():
                it.close()


def stream_workers(lanes: int, num_workers: int) -> int:
    """The largest worker count <= num_workers that divides `lanes` (0 stays 0: in-process)."""
    return max((w for w in range(1, min(lanes, num_workers) + 1) if lanes % w == 0), default=0)


def _raise_failures(source: Iterator) -> Iterator[HostBatch]:
    for item in source:
        if isinstance(item, StreamFailure):
            raise (ManifestError if item.kind == "manifest" else RemoteShardError)(item.message)
        yield item


# ---- the backend ----------------------------------------------------------------------------------


class StreamPool(TorchBatches):
    """The torch worker pool over `StreamBatches`; a worker's fatal error is re-raised here as the
    one-line error it was."""

    def iterate(self, plan: StreamPlan, first: int) -> Iterator[HostBatch]:
        return _raise_failures(super().iterate(plan, first))


class StreamBackend(TorchBackend):
    """The torch backend over a URL spec: the index from the manifest (`StreamIndex`), the plan with
    lanes (`StreamArgs`), samples from the lanes' streams (`StreamBatches`)."""

    def __init__(self, cfg: DataConfig):
        if cfg.num_workers and stream_workers(cfg.stream_lanes, cfg.num_workers) != cfg.num_workers:
            warnings.warn(
                f"data.num_workers={cfg.num_workers} does not divide data.stream_lanes={cfg.stream_lanes}: "
                f"streaming with {stream_workers(cfg.stream_lanes, cfg.num_workers)} workers (docs/streaming.md)",
                stacklevel=3,
            )

    def open_index(self, cfg: DataConfig, split: str) -> StreamIndex:
        return StreamIndex(cfg.shards, split, cfg.manifest, cfg.subset, cfg.subset_task, cfg.stream_deadline_s)

    def plan_args(self, args: PlanArgs, cfg: DataConfig) -> StreamArgs:
        return StreamArgs(
            **{**dataclasses.asdict(args), "shard_mix": cfg.shard_mix or DEFAULT_MIX},
            lanes=cfg.stream_lanes,
            buffer=cfg.stream_buffer,
        )

    def start(
        self,
        index: StreamIndex,
        plan_args: StreamArgs,
        options: BackendOptions,
        tokenizer: BatchTokenizer | None,
        bad: dict[int, str],
        stats: LoaderStats,
        max_batches: int,
    ) -> StreamPool:
        workers = stream_workers(plan_args.lanes, min(options.workers, max_batches))
        dataset = StreamBatches(index, plan_args, dataclasses.replace(options, workers=workers), tokenizer)
        return StreamPool(dataset, max_batches)

    def resume_state(self, index: StreamIndex, plan_args: StreamArgs) -> dict:
        a = plan_args
        return {"stream": {"lanes": a.lanes, "mix": a.shard_mix, "buffer": a.buffer, "shards": index.fingerprint()}}
