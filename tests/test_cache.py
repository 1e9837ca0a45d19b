"""Looking after the feature cache: listing, least-recently-used pruning, and removing only what the cache wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from filelock import FileLock
from test_cli_errors import one_line_exit_2
from test_features import CountingBackbone, jpeg_split

from protohead.cache import being_written, list_cache, parse_size, remove_entries, remove_leftovers, select_for_removal
from protohead.cli.main import main as cli
from protohead.data.base import take
from protohead.features import LOCK_DIR, MANIFEST_FILE, TOKENS_FILE, extract_features


def filled_cache(cache: Path) -> tuple[CountingBackbone, list[str]]:
    """Three entries of one backbone — 6 images, a 3-image re-split (copied rows), its hflip view — used in that
    order, an hour apart."""
    backbone = CountingBackbone()
    split = jpeg_split(6, digests=True)
    subset = take(split, [4, 1, 2])
    keys = [extract_features(backbone, images, cache, progress=False, view=view).key
            for images, view in ((split, "identity"), (subset, "identity"), (subset, "hflip"))]
    for when, key in enumerate(keys):  # (copying entry 0's rows into entry 1 counted as a use of entry 0)
        stamp = 1_000_000 + 3600 * when
        os.utime(cache / key / MANIFEST_FILE, (stamp, stamp))
    return backbone, keys


def test_list_describes_entries_and_sets_apart_what_it_did_not_write(tmp_path: Path) -> None:
    cache = tmp_path / "features"
    _, keys = filled_cache(cache)
    (cache / "notes.txt").write_text("mine")
    (cache / ("a" * 64)).mkdir()  # named like an entry, but holding a file the cache never writes
    (cache / ("a" * 64) / "data.csv").write_text("1,2")
    (cache / f".tmp-{keys[0][:16]}-abcd1234").mkdir()
    listing = list_cache(cache)
    assert [entry.key for entry in listing.entries] == keys  # least recently used first
    described = [entry.describe() for entry in listing.entries]
    assert [(d["view"], d["rows"], d["rows_reused"], d["problem"]) for d in described] == [
        ("identity", 6, 0, ""), ("identity", 3, 3, ""), ("hflip", 3, 0, "")]
    assert all(d["bytes"] == sum(f.stat().st_size for f in (cache / d["key"]).iterdir()) for d in described)
    assert listing.bytes == sum(d["bytes"] for d in described)
    assert [p.name for p in listing.foreign] == ["a" * 64, "notes.txt"]
    assert [p.name for p in listing.leftovers] == [f".tmp-{keys[0][:16]}-abcd1234"]


def test_a_hit_renews_last_use_and_max_size_removes_least_recently_used(tmp_path: Path) -> None:
    cache = tmp_path / "features"
    backbone, keys = filled_cache(cache)
    extract_features(backbone, jpeg_split(6, digests=True), cache, progress=False)  # the oldest entry, hit now
    listing = list_cache(cache)
    assert [entry.key for entry in listing.entries] == [keys[1], keys[2], keys[0]]
    sizes = {entry.key: entry.bytes for entry in listing.entries}
    chosen = select_for_removal(listing, max_bytes=sizes[keys[0]] + sizes[keys[2]])
    assert [entry.key for entry in chosen] == [keys[1]]
    assert [entry.key for entry in select_for_removal(listing, max_bytes=sizes[keys[0]])] == [keys[1], keys[2]]
    assert select_for_removal(listing, max_bytes=listing.bytes) == []
    removed, skipped = remove_entries(cache, chosen)
    assert [entry.key for entry in removed] == [keys[1]] and skipped == []
    assert sorted(entry.key for entry in list_cache(cache).entries) == sorted([keys[0], keys[2]])
    # a removed entry is an ordinary miss: its rows come back (copied again from the 6-image entry)
    images_before = backbone.images
    again = extract_features(backbone, take(jpeg_split(6, digests=True), [4, 1, 2]), cache, progress=False)
    assert again.key == keys[1] and backbone.images == images_before


def test_age_keys_and_all(tmp_path: Path) -> None:
    cache = tmp_path / "features"
    _, keys = filled_cache(cache)
    listing = list_cache(cache)
    now = 1_000_000 + 3600 * 2 + 1800
    assert [e.key for e in select_for_removal(listing, older_than_days=1 / 24, now=now)] == keys[:2]
    assert [e.key for e in select_for_removal(listing, keys=[keys[2][:8].upper()])] == [keys[2]]
    assert [e.key for e in select_for_removal(listing, everything=True)] == keys
    with pytest.raises(ValueError, match="names 0 cache entries"):
        select_for_removal(listing, keys=["zz"])
    with pytest.raises(ValueError, match="names every cache entries"):
        select_for_removal(listing, keys=[""])
    with pytest.raises(ValueError, match="say what to remove"):
        select_for_removal(listing)
    with pytest.raises(ValueError, match=">= 0"):
        select_for_removal(listing, max_bytes=-1)


def test_entries_in_use_and_live_writers_are_left_alone(tmp_path: Path) -> None:
    cache = tmp_path / "features"
    _, keys = filled_cache(cache)
    leftover = cache / f".tmp-{keys[0][:16]}-abcd1234"
    orphan = cache / f".trash-{'b' * 16}-abcd1234"
    leftover.mkdir()
    orphan.mkdir()
    listing = list_cache(cache)
    with FileLock(str(cache / LOCK_DIR / f"{keys[0]}.lock")):  # another process writing entry 0
        assert being_written(cache, leftover) and not being_written(cache, orphan)
        removed, skipped = remove_entries(cache, listing.entries)
        gone, kept = remove_leftovers(cache, listing.leftovers)
    assert not being_written(cache, leftover)
    assert [e.key for e in removed] == keys[1:] and [e.key for e in skipped] == [keys[0]]
    assert gone == [orphan] and kept == [leftover]
    assert [e.key for e in list_cache(cache).entries] == [keys[0]]
    assert remove_leftovers(cache, [leftover]) == ([leftover], [])
    assert not leftover.exists()


def test_corrupt_entries_are_listed_and_removable(tmp_path: Path) -> None:
    cache = tmp_path / "features"
    _, keys = filled_cache(cache)
    manifest = cache / keys[1] / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"hflip"', '"vflip"').replace('"identity"', '"vflip"'))
    (cache / keys[2] / TOKENS_FILE).unlink()
    listing = list_cache(cache)
    problems = {entry.key: entry.problem for entry in listing.entries}
    assert "fails its checksum" in problems[keys[1]] and problems[keys[0]] == ""
    assert problems[keys[2]] == ""  # the arrays are not checked here; a run rebuilds the entry on its next miss
    removed, _ = remove_entries(cache, select_for_removal(listing, keys=[keys[1][:10]]))
    assert [e.key for e in removed] == [keys[1]] and not (cache / keys[1]).exists()


def test_cli_list_and_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "features"
    _, keys = filled_cache(cache)
    (cache / "notes.txt").write_text("mine")
    assert cli(["cache", "list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "3 entries" in out and all(key[:12] in out for key in keys) and "(3 copied)" in out and "16×8" in out
    assert "not written by the cache (left alone)" in out and "notes.txt" in out
    assert cli(["cache", "prune", "--cache-dir", str(cache), "--all", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and [e["key"] for e in report["removed"]] == keys and report["bytes_left"] == 0
    assert len(list_cache(cache).entries) == 3  # a dry run removes nothing
    assert cli(["cache", "prune", "--cache-dir", str(cache), "--older-than", "0"]) == 0
    assert "removed 3 of 3 entries" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == [LOCK_DIR, "notes.txt"]
    one_line_exit_2(capsys, ["cache", "prune", "--cache-dir", str(cache), "--max-size", "lots"], "'lots'", "20G")
    one_line_exit_2(capsys, ["cache", "list", "--cache-dir", str(tmp_path / "none")], "no feature cache at")


def test_a_data_folder_given_as_the_cache_loses_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "x.jpg").write_bytes(b"\xff\xd8")
    (data / "metadata.csv").write_text("a,b\n")
    # folders named as the cache names its own, holding what it never writes
    (data / ".tmp-0123456789abcdef-backup").mkdir()
    (data / ".tmp-0123456789abcdef-backup" / "thesis.docx").write_text("years of work")
    (data / ".trash-0123456789abcdef-old" / "sub").mkdir(parents=True)
    (data / ("ab" * 32)).mkdir()
    (data / ("ab" * 32) / MANIFEST_FILE).write_text('{"study": "mine"}')
    (data / ("cd" * 32)).mkdir()
    (data / ("cd" * 32) / TOKENS_FILE).write_text("mine")  # an array alone: not an entry either
    assert len(list_cache(data).foreign) == 6 and not list_cache(data).entries and not list_cache(data).leftovers
    before = sorted(str(p) for p in data.rglob("*"))
    assert cli(["cache", "prune", "--cache-dir", str(data), "--all"]) == 0
    assert "removed 0 of 0 entries" in capsys.readouterr().out
    assert sorted(str(p) for p in data.rglob("*")) == before


def test_parse_size() -> None:
    assert [parse_size(s) for s in ("0", "512", "2K", "1.5M", "20G", "20GiB", "1t", "3 GB")] == [
        0, 512, 2048, int(1.5 * 2**20), 20 * 2**30, 20 * 2**30, 2**40, 3 * 2**30]
    for bad in ("", "-1G", "G", "1.2.3", "5X"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
