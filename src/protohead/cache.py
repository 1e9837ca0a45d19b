"""Look after the feature cache (:mod:`protohead.features`): list its entries, and remove entries to free disk —
least recently used first beyond a size, those unused for some days, named ones, or all of them.

The cache only grows on its own: every backbone, view, split and preprocessing change is an entry of its own, and a
re-split of the same images is a full copy of their rows (HAM10000's eight frozen multi-scale views: ≈ 11 GB per
split). Removal is limited to what the cache wrote and can recognise, so pointing it at the wrong folder loses
nothing:

- an entry is a folder named by a 64-hex-digit key holding only ``tokens.f16``, ``pooled.f16``, ``manifest.json``
  (and the temporary manifest a crash can leave), with both arrays — or, if they are gone, a manifest naming that
  key; any other folder or file is foreign, listed and never touched;
- ``.tmp-<16 hex>-*`` / ``.trash-<16 hex>-*`` folders holding only such files are what an interrupted extraction
  left; they are removed only when no process holds the lock of a key they can belong to (a live writer holds it);
- an entry is removed under its own lock, taken without waiting (an entry being written is skipped), by moving it
  aside first and deleting the moved folder, so a reader opening it finds it whole or absent. A process that already
  has it open keeps reading it (POSIX file systems delete a file only when its last reader closes it).

"Last used" is the manifest's modification time, which every cache hit renews
(:func:`protohead.features.touch_entry`).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protohead.features import (
    LOCK_DIR,
    MANIFEST_FILE,
    POOLED_FILE,
    TOKENS_FILE,
    CorruptCacheError,
    _discard,
    _load_manifest,
)

ENTRY_NAME = re.compile(r"[0-9a-f]{64}")
LEFTOVER_NAME = re.compile(r"\.(tmp|trash)-([0-9a-f]{16})-[A-Za-z0-9_]+")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the feature cache, as :func:`list_cache` found it.

    Attributes:
        path: the entry's folder.
        bytes: bytes of its files.
        last_used: when it was last written or hit (the manifest's modification time, seconds since the epoch).
        manifest: its parsed manifest; ``None`` when the manifest is missing or fails its checksum (``problem``).
        problem: why the entry is unusable, ``""`` when its manifest is sound (its arrays are not re-hashed here).
    """

    path: Path
    bytes: int
    last_used: float
    manifest: dict[str, Any] | None
    problem: str = ""

    @property
    def key(self) -> str:
        return self.path.name

    def describe(self) -> dict[str, Any]:
        """What a person needs to recognise the entry: backbone, view, split, rows (reused ones), shape."""
        manifest = self.manifest or {}
        return {"key": self.key, "backbone": manifest.get("backbone", "?"), "view": manifest.get("view", "identity"),
                "split": manifest.get("split_name", "?"), "rows": (manifest.get("tokens_shape") or ["?"])[0],
                "rows_reused": manifest.get("rows_reused", 0), "tokens_shape": manifest.get("tokens_shape"),
                "bytes": self.bytes, "last_used": self.last_used, "problem": self.problem}


@dataclass(frozen=True)
class CacheListing:
    """Everything in a cache folder: ``entries`` (least recently used first), ``leftovers`` of interrupted
    extractions, and ``foreign`` paths the cache did not write (never removed)."""

    entries: tuple[CacheEntry, ...]
    leftovers: tuple[Path, ...]
    foreign: tuple[Path, ...]

    @property
    def bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries)


def parse_size(text: str) -> int:
    """``"20G"``, ``"500M"``, ``"1.5T"``, ``"20GiB"``, ``"0"`` → bytes (K/M/G/T are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"size {text!r} is not a number with an optional K, M, G or T suffix (e.g. 20G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(size: float) -> str:
    """Bytes → ``"11.0 GiB"`` style."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _only_cache_files(path: Path) -> list[str] | None:
    """The names in folder ``path`` when every one is a plain file the cache writes into an entry (the arrays, the
    manifest, a temporary manifest a crash left); ``None`` when anything else is there (a folder, a link, another
    file) or ``path`` is not a plain folder."""
    if path.is_symlink() or not path.is_dir():
        return None
    names = []
    for child in path.iterdir():
        if child.is_symlink() or not child.is_file() or not (
                child.name in (TOKENS_FILE, POOLED_FILE, MANIFEST_FILE) or child.name.startswith(f".{MANIFEST_FILE}.")):
            return None
        names.append(child.name)
    return names


def _is_entry(path: Path) -> bool:
    """A folder the cache wrote: a key for a name, only the cache's files inside, and its arrays — or, when they are
    gone, a manifest naming the folder's key."""
    names = _only_cache_files(path) if ENTRY_NAME.fullmatch(path.name) else None
    if names is None:
        return False
    if TOKENS_FILE in names and POOLED_FILE in names:
        return True
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("key") == path.name and "format_version" in manifest


def _is_leftover(path: Path) -> bool:
    """What an interrupted extraction left: ``.tmp-<key16>-*`` / ``.trash-<key16>-*`` holding only cache files."""
    return LEFTOVER_NAME.fullmatch(path.name) is not None and _only_cache_files(path) is not None


def _read_entry(path: Path) -> CacheEntry:
    size = sum(child.stat().st_size for child in path.iterdir())
    manifest_path = path / MANIFEST_FILE
    last_used = (manifest_path if manifest_path.exists() else path).stat().st_mtime
    try:
        manifest: dict[str, Any] | None = _load_manifest(path)
        problem = ""
    except CorruptCacheError as error:
        manifest, problem = None, str(error)
    if manifest is not None and manifest.get("key") != path.name:
        manifest, problem = None, f"{manifest_path} names key {manifest.get('key')!r}, not its folder's"
    return CacheEntry(path=path, bytes=size, last_used=last_used, manifest=manifest, problem=problem)


def list_cache(cache_dir: str | Path) -> CacheListing:
    """Every entry, leftover and foreign path directly under ``cache_dir`` (the ``.locks`` folder excepted).

    Raises:
        FileNotFoundError: ``cache_dir`` does not exist. ``ValueError``: it is not a folder.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.exists():
        raise FileNotFoundError(f"no feature cache at {cache_dir}")
    if not cache_dir.is_dir():
        raise ValueError(f"feature cache {cache_dir} is not a folder")
    entries, leftovers, foreign = [], [], []
    for path in sorted(cache_dir.iterdir()):
        if path.name == LOCK_DIR and path.is_dir() and not path.is_symlink():
            continue
        if _is_entry(path):
            entries.append(_read_entry(path))
        elif _is_leftover(path):
            leftovers.append(path)
        else:
            foreign.append(path)
    entries.sort(key=lambda entry: (entry.last_used, entry.key))
    return CacheListing(tuple(entries), tuple(leftovers), tuple(foreign))


def select_for_removal(listing: CacheListing, max_bytes: int | None = None, older_than_days: float | None = None,
                       keys: Sequence[str] = (), everything: bool = False,
                       now: float | None = None) -> list[CacheEntry]:
    """The entries to remove, least recently used first: all (``everything``); those whose key starts with one of
    ``keys`` (each prefix must name exactly one entry); those unused for ``older_than_days``; and, least recently
    used first, as many as it takes to bring the rest to ``max_bytes``. Criteria add up.

    Raises:
        ValueError: a key prefix that names no entry or several, a negative size or age, or no criterion at all.
    """
    if not everything and not keys and max_bytes is None and older_than_days is None:
        raise ValueError("say what to remove: a size to keep the cache under, an age, entry keys, or all")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"the size to keep the cache under must be >= 0, got {max_bytes}")
    if older_than_days is not None and older_than_days < 0:
        raise ValueError(f"the age must be >= 0 days, got {older_than_days}")
    chosen: set[str] = set()
    for prefix in keys:
        matches = [entry.key for entry in listing.entries if entry.key.startswith(prefix.lower())]
        if len(matches) != 1 or not prefix:
            raise ValueError(f"key {prefix!r} names {len(matches) if prefix else 'every'} cache entries, "
                             "not exactly one")
        chosen.update(matches)
    now = time.time() if now is None else now
    for entry in listing.entries:
        if everything or (older_than_days is not None and now - entry.last_used > older_than_days * 86400):
            chosen.add(entry.key)
    if max_bytes is not None:
        kept = sum(entry.bytes for entry in listing.entries if entry.key not in chosen)
        for entry in listing.entries:  # least recently used first
            if kept <= max_bytes:
                break
            if entry.key not in chosen:
                chosen.add(entry.key)
                kept -= entry.bytes
    return [entry for entry in listing.entries if entry.key in chosen]


@contextlib.contextmanager
def _held_without_waiting(cache_dir: Path, keys: Sequence[str]) -> Iterator[bool]:
    """Hold every one of ``keys``' entry locks, or none: yields ``False`` when a process holds one of them."""
    from filelock import FileLock, Timeout

    if keys:
        (cache_dir / LOCK_DIR).mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        for key in keys:
            try:
                stack.enter_context(FileLock(str(cache_dir / LOCK_DIR / f"{key}.lock"), timeout=0))
            except Timeout:
                yield False
                return
        yield True


def remove_entries(cache_dir: str | Path, entries: Sequence[CacheEntry]) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove ``entries`` (from :func:`list_cache` of ``cache_dir``), each under its lock taken without waiting →
    (removed, skipped because a process holds the lock). An entry that is no longer a cache entry is skipped."""
    cache_dir = Path(cache_dir)
    removed, skipped = [], []
    for entry in entries:
        if entry.path.parent != cache_dir:
            raise ValueError(f"{entry.path} is not an entry of {cache_dir}")
        with _held_without_waiting(cache_dir, [entry.key]) as held:
            if held and _is_entry(entry.path):
                _discard(entry.path)
                removed.append(entry)
            else:
                skipped.append(entry)
    return removed, skipped


def _writer_keys(cache_dir: Path, leftover: Path) -> list[str]:
    """The keys whose lock a live writer of ``leftover`` (``.tmp-<key16>-*`` or ``.trash-<key16>-*``) holds."""
    match = LEFTOVER_NAME.fullmatch(leftover.name)
    if leftover.parent != cache_dir or match is None:
        raise ValueError(f"{leftover} is not an extraction's temporary folder in {cache_dir}")
    locks = cache_dir / LOCK_DIR
    return [lock.name.removesuffix(".lock") for lock in locks.glob(f"{match.group(2)}*.lock")] \
        if locks.is_dir() else []


def being_written(cache_dir: str | Path, leftover: Path) -> bool:
    """Whether a process is writing ``leftover`` now (holds the lock of a key it can belong to); ``False`` means an
    interrupted extraction left it."""
    cache_dir = Path(cache_dir)
    with _held_without_waiting(cache_dir, _writer_keys(cache_dir, leftover)) as held:
        return not held


def remove_leftovers(cache_dir: str | Path, leftovers: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Remove what interrupted extractions left (``.tmp-<key16>-*``, ``.trash-<key16>-*``) → (removed, skipped):
    one is skipped while a process holds the lock of any key starting with its 16 digits (it is being written)."""
    import shutil

    cache_dir = Path(cache_dir)
    removed, skipped = [], []
    for path in leftovers:
        with _held_without_waiting(cache_dir, _writer_keys(cache_dir, path)) as held:
            if held and _is_leftover(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            else:
                skipped.append(path)
    return removed, skipped
