"""Feature cache: run a backbone once over an :class:`~protohead.data.base.ImageSplit`, keep the
token grids and pooled features on disk as float16 memmaps, and reuse them while the backbone
weights, preprocessing and image list are unchanged.

Cache layout (one directory per key)::

    cache_dir/<key>/tokens.f16      raw float16, C order, shape (n, N, F)
    cache_dir/<key>/pooled.f16      raw float16, C order, shape (n, F)
    cache_dir/<key>/manifest.json   shapes, dtype, ids, labels, backbone key, split fingerprint,
                                    per-file byte sizes, sha256 and sampled-block sha256, and a sha256
                                    of the manifest itself

``key = sha256(backbone.cache_key(), split.fingerprint(), FORMAT_VERSION[, view])`` (a flipped or rotated view of
the images, :mod:`protohead.views`, is an entry of its own), so a changed backbone,
image list, label or file content gives a different directory (a plain miss). Extraction writes into
a temporary sibling directory that is ``os.replace``-d into place only when complete, so an
interrupted run never leaves a half-written cache.

Rows are reused across splits: a manifest lists the sha256 of every row's image file (``image_sha256``, when the
loader knows it: :attr:`ImageSplit.image_digests`), and a miss first copies the rows of images that another entry of
the same backbone key, view and format already holds (that entry verified as on a hit), then runs the backbone on the
rest only. So a re-split of the same images (``split=lesion`` with another seed, a class-folder layout of the same
files, a subset) costs a copy, not an extraction. A reused row is bit-for-bit the row computed before; a fresh
extraction of the same image in another batch can differ in the last float16 digit. Entries written before the
digests existed get them recorded on their next hit (their key proves which files they were computed from).

Integrity on load: the manifest must parse and match its own checksum, and every array file must have
exactly the expected byte size (catches truncation). ``verify="full"`` (default) additionally
re-hashes every array file with sha256 (~0.6 s per GB when the file is in the page cache, plus disk
read time otherwise; HAM10000 tokens at 224 px are ~880 MB); ``verify="fast"`` only re-hashes 64
evenly spaced 64 KiB blocks per file (milliseconds) -- it catches truncation and most overwrites but
not a flipped byte between sampled blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from protohead.backbones.base import Backbone
from protohead.data.base import ImageSplit, take
from protohead.views import apply_view, check_view

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.f16"
POOLED_FILE = "pooled.f16"
MANIFEST_FILE = "manifest.json"
LOCK_DIR = ".locks"  # one lock file per entry; never removed (removing a lock file races with its users)
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 64 * 1024
_HASH_CHUNK = 8 * 1024 * 1024


class CorruptCacheError(ValueError):
    """A cache directory exists for the key but is unusable; the message names the offending file."""


@dataclass(frozen=True)
class FeatureSet:
    """Cached backbone features of one split (read-only).

    Attributes:
        tokens: (n, N, F) float16 read-only ``np.memmap``.
        pooled: (n, F) float16 read-only ``np.memmap``.
        labels: (n,) int64 (read-only).
        ids: image ids, same order as the rows.
        key: cache key (directory name under ``cache_dir``).
        path: the cache directory.
        image_digests: sha256 of each row's image file when the manifest records them, else ``None``.
    """

    tokens: np.ndarray
    pooled: np.ndarray
    labels: np.ndarray
    ids: tuple[str, ...]
    key: str = ""
    path: Path | None = None
    image_digests: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        """N."""
        return int(self.tokens.shape[1])

    @property
    def feature_dim(self) -> int:
        """F."""
        return int(self.tokens.shape[2])

    def torch_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``indices`` (in that order) -> tokens (B, N, F) float32, pooled (B, F) float32, labels (B,) int64."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        tokens = np.array(self.tokens[idx], dtype=np.float32)
        pooled = np.array(self.pooled[idx], dtype=np.float32)
        labels = np.array(self.labels[idx], dtype=np.int64)
        return torch.from_numpy(tokens), torch.from_numpy(pooled), torch.from_numpy(labels)


# ---------------------------------------------------------------------- keys and checksums
def feature_cache_key(backbone: Backbone, split: ImageSplit, view: str = "identity") -> str:
    """sha256 hex of (backbone.cache_key(), split.fingerprint(), FORMAT_VERSION[, view]); the identity view adds
    nothing, so its key is the one every cache had before views existed."""
    fields: dict[str, Any] = {"backbone": backbone.cache_key(), "split": split.fingerprint(), "format": FORMAT_VERSION}
    if view != "identity":
        fields["view"] = view
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 hex of a whole file, streamed in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sampled_sha256(path: Path, size: int) -> str:
    """sha256 hex over ``SAMPLE_BLOCKS`` evenly spaced blocks (incl. first and last) plus the size."""
    digest = hashlib.sha256(str(size).encode())
    block = min(SAMPLE_BLOCK_BYTES, size)
    if size == 0:
        return digest.hexdigest()
    offsets = np.unique(np.linspace(0, size - block, SAMPLE_BLOCKS).astype(np.int64))
    with open(path, "rb") as handle:
        for offset in offsets.tolist():
            handle.seek(offset)
            digest.update(handle.read(block))
    return digest.hexdigest()


def _manifest_digest(manifest: dict[str, object]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------- loading
def _open_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    if 0 in shape:
        array = np.zeros(shape, dtype=np.float16)
        array.flags.writeable = False
        return array
    return np.memmap(path, dtype=np.float16, mode="r", shape=shape)


def _load_manifest(entry: Path) -> dict[str, Any]:
    """``entry``'s manifest, parsed and checked against its own checksum; ``CorruptCacheError`` otherwise."""
    manifest_path = entry / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise CorruptCacheError(f"feature cache manifest {manifest_path} is unreadable: {error}") from error
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise CorruptCacheError(f"feature cache manifest {manifest_path} fails its checksum")
    return manifest


def open_feature_cache(entry: Path, key: str | None = None, ids: Sequence[str] | None = None,
                       verify: Literal["full", "fast"] = "full") -> FeatureSet:
    """Open and verify one cache directory.

    Args:
        entry: ``cache_dir/<key>``.
        key: expected key (checked against the manifest when given).
        ids: expected image ids (checked when given).
        verify: ``"full"`` re-hashes the array files; ``"fast"`` checks sizes + sampled blocks.

    Raises:
        CorruptCacheError: (a ``ValueError``) naming the file that is missing, truncated or mismatched.
    """
    entry = Path(entry)
    return _open_entry(entry, _load_manifest(entry), key, ids, verify)


def _open_entry(entry: Path, manifest: dict[str, Any], key: str | None, ids: Sequence[str] | None,
                verify: Literal["full", "fast"]) -> FeatureSet:
    """:func:`open_feature_cache` on a manifest already loaded (:func:`_load_manifest`)."""
    manifest_path = entry / MANIFEST_FILE
    try:
        if manifest["format_version"] != FORMAT_VERSION:
            raise CorruptCacheError(f"{manifest_path}: format version {manifest['format_version']}, "
                                    f"expected {FORMAT_VERSION}")
        if key is not None and manifest["key"] != key:
            raise CorruptCacheError(f"{manifest_path}: key {manifest['key']} does not match {key}")
        n, num_tokens, dim = (int(v) for v in manifest["tokens_shape"])
        cached_ids = tuple(manifest["ids"])
        labels = np.asarray(manifest["labels"], dtype=np.int64)
        files = manifest["files"]
        shapes = {TOKENS_FILE: (n, num_tokens, dim), POOLED_FILE: (n, dim)}
        if len(cached_ids) != n or labels.shape != (n,):
            raise CorruptCacheError(f"{manifest_path}: {len(cached_ids)} ids / {labels.shape[0]} labels "
                                    f"for {n} rows")
        if ids is not None and cached_ids != tuple(ids):
            raise CorruptCacheError(f"{manifest_path}: image ids differ from the split")
        digests = manifest.get("image_sha256")
        if digests is not None and (not isinstance(digests, list) or len(digests) != n
                                    or not all(isinstance(d, str) for d in digests)):
            raise CorruptCacheError(f"{manifest_path}: image_sha256 is not a list of {n} digests")
        for name, shape in shapes.items():
            path = entry / name
            expected = int(np.prod(shape)) * 2
            if int(files[name]["bytes"]) != expected:
                raise CorruptCacheError(f"{manifest_path}: {name} size entry does not match its shape")
            try:
                actual = path.stat().st_size
            except OSError as error:
                raise CorruptCacheError(f"feature cache file {path} is missing: {error}") from error
            if actual != expected:
                raise CorruptCacheError(f"feature cache file {path} is truncated or padded: "
                                        f"{actual} bytes, expected {expected}")
            if verify == "full":
                ok = file_sha256(path) == files[name]["sha256"]
            else:
                ok = sampled_sha256(path, actual) == files[name]["sampled_sha256"]
            if not ok:
                raise CorruptCacheError(f"feature cache file {path} fails its {verify} checksum")
    except (KeyError, TypeError) as error:
        raise CorruptCacheError(f"feature cache manifest {manifest_path} is malformed: {error!r}") from error
    labels.flags.writeable = False
    try:  # (an entry removed since its checks, e.g. by `protohead cache prune`, is a miss like any other)
        tokens = _open_array(entry / TOKENS_FILE, shapes[TOKENS_FILE])
        pooled = _open_array(entry / POOLED_FILE, shapes[POOLED_FILE])
    except OSError as error:
        raise CorruptCacheError(f"feature cache entry {entry} cannot be opened: {error}") from error
    return FeatureSet(tokens=tokens, pooled=pooled, labels=labels, ids=cached_ids, key=str(manifest["key"]),
                      path=entry, image_digests=None if digests is None else tuple(digests))


def touch_entry(entry: Path) -> None:
    """Mark ``entry`` as used now: its manifest's modification time, what :mod:`protohead.cache` removes the least
    recently used entries by. A cache that cannot be written is left as it is."""
    with contextlib.suppress(OSError):
        os.utime(entry / MANIFEST_FILE)


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` (with its checksum) as ``directory``'s manifest, atomically (temporary file, fsync,
    ``os.replace``): a reader sees the old manifest or the new one, never a mix."""
    manifest = {**manifest, "manifest_sha256": _manifest_digest(manifest)}
    tmp = directory / f".{MANIFEST_FILE}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as handle:
            json.dump(manifest, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / MANIFEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ReusedRows:
    """Rows ``source_rows`` of the cached ``source`` are rows ``target_rows`` of the entry being written."""

    source: FeatureSet
    source_rows: np.ndarray
    target_rows: np.ndarray


def reusable_rows(cache_dir: Path, backbone: Backbone, split: ImageSplit, view: str = "identity",
                  verify: Literal["full", "fast"] = "full", exclude: str = "") -> list[ReusedRows]:
    """Rows of ``split`` that other entries of ``cache_dir`` already hold: same backbone key, view and format, and an
    image file with the same sha256. Each source is verified as on a hit (``verify``); an entry that fails is passed
    over (its rows are computed instead). ``exclude``: an entry key not to read (the one being written). ``[]`` when
    the split does not know its images' digests."""
    if split.image_digests is None:
        return []
    wanted: dict[str, list[int]] = {}
    for row, digest in enumerate(split.image_digests):
        wanted.setdefault(digest, []).append(row)
    backbone_key = backbone.cache_key()
    found: list[ReusedRows] = []
    for entry in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        if not wanted:
            break
        if entry.name.startswith(".") or entry.name == exclude or not entry.is_dir():
            continue
        try:
            manifest = _load_manifest(entry)
            if (manifest.get("format_version") != FORMAT_VERSION or manifest.get("backbone_key") != backbone_key
                    or manifest.get("view", "identity") != view
                    or not isinstance(manifest.get("tokens_shape"), list)
                    or manifest["tokens_shape"][1:] != [backbone.num_tokens, backbone.feature_dim]):
                continue
            # the cheap test first: only an entry holding some of the images has its arrays verified
            if not any(digest in wanted for digest in manifest.get("image_sha256") or ()):
                continue
            source = _open_entry(entry, manifest, entry.name, None, verify)
        except CorruptCacheError:
            continue
        touch_entry(entry)
        hits = {digest: row for row, digest in enumerate(source.image_digests or ()) if digest in wanted}
        rows, targets = (np.asarray(column, dtype=np.int64) for column in zip(*sorted(
            (row, target) for digest, row in hits.items() for target in wanted.pop(digest)), strict=True))
        found.append(ReusedRows(source, rows, targets))
    return found


def record_image_digests(entry: Path, features: FeatureSet, split: ImageSplit) -> None:
    """Add ``split``'s image digests to the manifest of an entry written before manifests held them.

    Only for the entry of ``split``'s own key (``features`` opened from it): the key covers the split's content key,
    itself a hash over these digests, so they describe exactly the files the entry was computed from. Called under
    the entry's lock; a cache folder that cannot be written (read-only) keeps its manifest as it is."""
    if features.image_digests is not None or split.image_digests is None or features.ids != split.ids:
        return
    try:
        manifest = _load_manifest(entry)
    except CorruptCacheError:
        return
    if manifest.get("key") != features.key or "image_sha256" in manifest:
        return
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    with contextlib.suppress(OSError):
        _write_manifest(entry, {**body, "image_sha256": list(split.image_digests)})


# ---------------------------------------------------------------------- extraction
def iter_preprocessed(backbone: Backbone, split: ImageSplit, batch_size: int,
                      num_workers: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, x)`` with ``x`` = (b, 3, S, S) preprocessed images ``start .. start+b-1``, in order.

    With ``num_workers >= 1`` images are decoded / resized by that many background threads, up to
    ``num_workers + 1`` batches ahead of the consumer (PIL releases the GIL while decoding and
    resizing, so this overlaps with the backbone forward). ``num_workers=0`` loads synchronously.
    """
    n = len(split)

    def load(start: int) -> torch.Tensor:
        return backbone.preprocess([split.load(i) for i in range(start, min(n, start + batch_size))])

    starts = iter(range(0, n, batch_size))
    if num_workers <= 0:
        for start in starts:
            yield start, load(start)
        return
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="protohead-decode")
    try:
        pending: deque[tuple[int, Future[torch.Tensor]]] = deque()
        for _ in range(num_workers + 1):
            start = next(starts, None)
            if start is not None:
                pending.append((start, pool.submit(load, start)))
        while pending:
            start, future = pending.popleft()
            following = next(starts, None)
            if following is not None:
                pending.append((following, pool.submit(load, following)))
            yield start, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_features(backbone: Backbone, split: ImageSplit, directory: Path, key: str, batch_size: int,
                    progress: bool, num_workers: int, view: str = "identity",
                    reused: Sequence[ReusedRows] = ()) -> None:
    """Write ``split``'s entry into ``directory``: the ``reused`` rows copied from their sources, the backbone run on
    the other images only, then the manifest (file checksums of what was written)."""
    n, num_tokens, dim = len(split), backbone.num_tokens, backbone.feature_dim
    token_path, pooled_path = directory / TOKENS_FILE, directory / POOLED_FILE
    to_compute = np.ones(n, dtype=bool)
    if n == 0:
        token_path.touch()
        pooled_path.touch()
    else:
        tokens_out = np.memmap(token_path, dtype=np.float16, mode="w+", shape=(n, num_tokens, dim))
        pooled_out = np.memmap(pooled_path, dtype=np.float16, mode="w+", shape=(n, dim))
        for part in reused:
            for start in range(0, len(part.source_rows), 256):
                rows, targets = part.source_rows[start:start + 256], part.target_rows[start:start + 256]
                tokens_out[targets] = part.source.tokens[rows]
                pooled_out[targets] = part.source.pooled[rows]
            to_compute[part.target_rows] = False
        rows_to_compute = np.flatnonzero(to_compute)
        images = take(split, rows_to_compute.tolist())
        device = backbone.device
        was_training = backbone.training
        backbone.eval()
        label = backbone.name if view == "identity" else f"{backbone.name} {view}"
        bar = tqdm(total=len(images), unit="img", desc=f"features {label}", disable=not progress)
        try:
            with torch.inference_mode():
                for start, x in iter_preprocessed(backbone, images, batch_size, num_workers):
                    tokens, pooled = backbone(apply_view(x.to(device, non_blocking=True), view))
                    b = x.shape[0]
                    if tuple(tokens.shape) != (b, num_tokens, dim) or tuple(pooled.shape) != (b, dim):
                        raise ValueError(f"{backbone.name} returned tokens {tuple(tokens.shape)} and pooled "
                                         f"{tuple(pooled.shape)}, expected ({b}, {num_tokens}, {dim}) "
                                         f"and ({b}, {dim})")
                    tokens16 = np.ascontiguousarray(tokens.to(torch.float16).cpu().numpy())
                    pooled16 = np.ascontiguousarray(pooled.to(torch.float16).cpu().numpy())
                    if not (np.isfinite(tokens16).all() and np.isfinite(pooled16).all()):
                        bad = images.ids[start:start + b]
                        raise ValueError(f"non-finite (or float16-overflowing) features for images {bad}")
                    rows = rows_to_compute[start:start + b]
                    tokens_out[rows] = tokens16
                    pooled_out[rows] = pooled16
                    bar.update(b)
        finally:
            bar.close()
            backbone.train(was_training)
        tokens_out.flush()
        pooled_out.flush()
        del tokens_out, pooled_out

    files = {}
    for path in (token_path, pooled_path):
        size = path.stat().st_size
        files[path.name] = {"bytes": size, "sha256": file_sha256(path), "sampled_sha256": sampled_sha256(path, size)}
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "backbone": backbone.name,
        "backbone_key": backbone.cache_key(),
        "split_name": split.name,
        "split_fingerprint": split.fingerprint(),
        "dtype": "float16",
        "tokens_shape": [n, num_tokens, dim],
        "pooled_shape": [n, dim],
        "image_size": backbone.image_size,
        "view": view,
        "ids": list(split.ids),
        "labels": np.asarray(split.labels, dtype=np.int64).tolist(),
        "files": files,
        "rows_reused": int(n - to_compute.sum()),
        "reused_from": sorted({part.source.key for part in reused}),
    }
    if split.image_digests is not None:
        manifest["image_sha256"] = list(split.image_digests)
    _write_manifest(directory, manifest)


def _discard(path: Path) -> None:
    """Move ``path`` aside atomically, then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name[:16]}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def extract_features(backbone: Backbone, split: ImageSplit, cache_dir: str | Path, batch_size: int = 32,
                     progress: bool = True, num_workers: int = 1,
                     on_corrupt: Literal["rebuild", "error"] = "rebuild",
                     verify: Literal["full", "fast"] = "full", view: str = "identity") -> FeatureSet:
    """Backbone features of every image of ``split``, from the cache or computed and cached.

    Args:
        backbone: any :class:`Backbone`; run in eval mode under ``torch.inference_mode()`` (its
            train/eval state is restored afterwards).
        split: images to encode (rows follow ``split.ids``).
        cache_dir: root of the cache; the entry is ``cache_dir/<feature_cache_key(...)>``.
        batch_size: images per forward.
        progress: show a tqdm bar over images.
        num_workers: background decode threads (0 = decode in the calling thread).
        on_corrupt: what to do with a corrupt entry for this key: ``"rebuild"`` (warn naming the file,
            then re-extract) or ``"error"`` (raise ``ValueError`` naming the file).
        verify: integrity check on a hit, see the module docstring.
        view: one of :data:`protohead.views.VIEWS`, applied to the preprocessed images (its own cache entry).

    Returns:
        FeatureSet: tokens (n, N, F) and pooled (n, F) float16 read-only memmaps, labels (n,), ids.
    """
    if on_corrupt not in ("rebuild", "error"):
        raise ValueError(f"on_corrupt must be 'rebuild' or 'error', got {on_corrupt!r}")
    if verify not in ("full", "fast"):
        raise ValueError(f"verify must be 'full' or 'fast', got {verify!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cache_dir = Path(cache_dir)
    key = feature_cache_key(backbone, split, check_view(view))
    entry = cache_dir / key
    if entry.exists():  # the common case, without taking the lock
        with contextlib.suppress(CorruptCacheError):
            features = open_feature_cache(entry, key=key, ids=split.ids, verify=verify)
            if features.image_digests is None and split.image_digests is not None and os.access(entry, os.W_OK):
                with contextlib.suppress(OSError), entry_lock(cache_dir, key):
                    record_image_digests(entry, features, split)
            touch_entry(entry)
            return features
    cache_dir.mkdir(parents=True, exist_ok=True)
    with entry_lock(cache_dir, key):  # one writer per entry; readers that lost the race find it below
        if entry.exists():
            try:
                features = open_feature_cache(entry, key=key, ids=split.ids, verify=verify)
                record_image_digests(entry, features, split)
                touch_entry(entry)
                return features
            except CorruptCacheError as error:
                if on_corrupt == "error":
                    raise
                warnings.warn(f"{error}; rebuilding the feature cache", RuntimeWarning, stacklevel=2)
        remove_stale_temporaries(cache_dir, key)
        reused = reusable_rows(cache_dir, backbone, split, view, verify, exclude=key)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=cache_dir))
        try:
            _write_features(backbone, split, tmp, key, batch_size, progress, num_workers, view, reused)
            _discard(entry)  # a corrupt entry
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return open_feature_cache(entry, key=key, ids=split.ids, verify="fast")


def entry_lock(cache_dir: Path, key: str) -> Any:
    """An exclusive inter-process lock for one cache entry (``cache_dir/.locks/<key>.lock``, via ``filelock``)."""
    from filelock import FileLock

    (cache_dir / LOCK_DIR).mkdir(exist_ok=True)
    return FileLock(str(cache_dir / LOCK_DIR / f"{key}.lock"))


def remove_stale_temporaries(cache_dir: Path, key: str) -> list[Path]:
    """Remove what an extraction of ``key`` killed mid-way left (``.tmp-<key16>-*``, ``.trash-<key16>-*``).

    Only called under the entry's lock, so no live writer owns them. Returns the removed folders.
    """
    stale = [path for pattern in (f".tmp-{key[:16]}-*", f".trash-{key[:16]}-*") for path in cache_dir.glob(pattern)
             if path.is_dir() and not path.is_symlink()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale
