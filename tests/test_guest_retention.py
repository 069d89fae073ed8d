"""Pruning the guest image caches (vmshare.guest.retention) in temporary trees:
which entries go, which stay, and that pruning never fails a build."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from vmshare.guest import builder, debian
from vmshare.guest.retention import (
    LAST_USE_NAME,
    RETENTION_ENV,
    mark_used,
    prune_cache,
    use_entry,
)

DAY = 86400.0
KEEP = "0123456789abcdef01234567"
OLD = "a" * 24
RECENT = "b" * 24


@pytest.fixture(autouse=True)
def no_retention_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's shell must not change the default retention under test."""
    monkeypatch.delenv(RETENTION_ENV, raising=False)


def age(path: Path, days: float) -> None:
    """Set ``path``'s mtime (not following a symlink) ``days`` into the past."""
    t = time.time() - days * DAY
    os.utime(path, (t, t), follow_symlinks=False)


def entry(cache: Path, name: str, days: float | None, marker: bool = True,
          image: str = "root.img") -> Path:
    """A cache entry holding a 64 KiB image, last used ``days`` ago (None: now)."""
    path = cache / name
    path.mkdir(parents=True)
    (path / image).write_bytes(b"\x5a" * 65536)
    if marker:
        (path / LAST_USE_NAME).touch()
    if days is not None:
        if marker:
            age(path / LAST_USE_NAME, days)
        age(path, days)
    return path


def test_an_entry_unused_for_the_retention_goes_and_a_recent_one_stays(tmp_path: Path) -> None:
    entry(tmp_path, KEEP, None)
    entry(tmp_path, OLD, 15)
    entry(tmp_path, RECENT, 13)
    freed = prune_cache(tmp_path, keep=KEEP)
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEEP, RECENT]
    assert freed >= 65536                      # the old image's blocks


def test_a_recent_marker_keeps_an_old_directory(tmp_path: Path) -> None:
    """The last use is the marker's time, not the directory's (its build)."""
    old_build = entry(tmp_path, OLD, 30)
    (old_build / LAST_USE_NAME).touch()        # used just now
    age(old_build, 30)
    prune_cache(tmp_path, keep=KEEP)
    assert old_build.is_dir()


def test_an_entry_without_a_marker_ages_from_its_build(tmp_path: Path) -> None:
    """Entries made before markers existed go by the directory's mtime."""
    entry(tmp_path, OLD, 20, marker=False)
    entry(tmp_path, RECENT, 1, marker=False)
    prune_cache(tmp_path, keep=KEEP)
    assert [p.name for p in tmp_path.iterdir()] == [RECENT]


def test_the_entry_in_use_stays_even_with_an_old_marker(tmp_path: Path) -> None:
    used = entry(tmp_path, KEEP, 100)
    entry(tmp_path, OLD, 100)
    prune_cache(tmp_path, keep=KEEP)
    assert [p.name for p in tmp_path.iterdir()] == [KEEP]
    assert (used / "root.img").is_file()


def test_use_entry_refreshes_the_marker_then_prunes(tmp_path: Path) -> None:
    used = entry(tmp_path, KEEP, 100)
    entry(tmp_path, OLD, 3)
    use_entry(used, retention_s=2 * DAY)
    assert time.time() - (used / LAST_USE_NAME).stat().st_mtime < 60
    assert [p.name for p in tmp_path.iterdir()] == [KEEP]
    used_again = entry(tmp_path / "fresh", KEEP, None, marker=False)
    use_entry(used_again)                      # makes the marker when there is none
    assert (used_again / LAST_USE_NAME).is_file()


def test_other_names_and_symlinks_are_left_alone(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    target = entry(outside, OLD, 100)
    staging_target = entry(outside, ".build-abcd1234", 100)
    cache.mkdir()
    strangers = {
        "c" * 24: "file",                      # a key's name but not a directory
        "C" * 24: "dir",                       # upper case: not a key
        "d" * 23: "dir",                       # too short
        "e" * 25: "dir",                       # too long
        "notes": "dir",
        ".build": "dir",                       # not the staging shape
        ".build-../x": None,
        "lost+found": "dir",
    }
    for name, kind in strangers.items():
        if kind == "file":
            (cache / name).write_bytes(b"x")
        elif kind == "dir":
            entry(cache, name, 100)
    (cache / ("f" * 24)).symlink_to(target)
    (cache / ".build-0123abcd").symlink_to(staging_target)
    for link in ("f" * 24, ".build-0123abcd"):
        age(cache / link, 100)
    for path in cache.iterdir():
        age(path, 100)
    before = sorted(p.name for p in cache.iterdir())
    with caplog.at_level(logging.INFO, logger="vmshare.guest.retention"):
        assert prune_cache(cache, keep=KEEP) == 0
    assert caplog.text == ""                   # not even tried (rmtree would refuse a link)
    assert sorted(p.name for p in cache.iterdir()) == before
    assert (target / "root.img").is_file() and (staging_target / "root.img").is_file()


def test_a_killed_builders_staging_goes_after_a_day_a_live_ones_stays(tmp_path: Path) -> None:
    abandoned = [tmp_path / f".build-{KEEP}-x1_9ab2q", tmp_path / ".build-k7_qz0aa"]
    live = [tmp_path / f".build-{OLD}-m2xk0l_p", tmp_path / ".build-8cq0_1rt"]
    for path in abandoned + live:
        (path / "tree").mkdir(parents=True)
        (path / "tree" / "half.img").write_bytes(b"\0" * 4096)
    for path in abandoned:
        age(path, 1.1)
    for path in live:
        age(path, 0.9)
    prune_cache(tmp_path, keep=KEEP)
    assert sorted(tmp_path.iterdir()) == sorted(live)


def test_an_oserror_while_pruning_is_logged_not_raised(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    entry(tmp_path, OLD, 30)
    entry(tmp_path, RECENT, 30)
    removed: list[str] = []
    real_rmtree = shutil.rmtree

    def refuse_first(path: Path) -> None:
        if not removed:
            removed.append("refused")
            raise PermissionError(13, "Permission denied", str(path))
        removed.append(Path(path).name)
        real_rmtree(path)

    monkeypatch.setattr(shutil, "rmtree", refuse_first)
    with caplog.at_level(logging.WARNING, logger="vmshare.guest.retention"):
        freed = prune_cache(tmp_path, keep=KEEP)
    assert [p.name for p in tmp_path.iterdir()] == [OLD]     # the next one still went
    assert removed == ["refused", RECENT]
    assert freed >= 65536
    assert "Permission denied" in caplog.text and OLD in caplog.text


def test_an_entry_a_concurrent_pruner_removed_first_is_no_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    entry(tmp_path, OLD, 30)
    real_rmtree = shutil.rmtree

    def beaten(path: Path) -> None:
        real_rmtree(path)                      # the other process got there first
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(shutil, "rmtree", beaten)
    with caplog.at_level(logging.WARNING, logger="vmshare.guest.retention"):
        assert prune_cache(tmp_path, keep=KEEP) == 0
    assert caplog.text == "" and not (tmp_path / OLD).exists()


def test_a_missing_cache_or_entry_is_logged_not_raised(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    with caplog.at_level(logging.WARNING, logger="vmshare.guest.retention"):
        assert prune_cache(tmp_path / "absent", keep=KEEP) == 0
        mark_used(tmp_path / "absent" / KEEP)
        assert use_entry(tmp_path / "absent" / KEEP) == 0
    assert "cannot list" in caplog.text and "cannot record the use" in caplog.text


def test_a_marker_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    used = entry(tmp_path / "cache", KEEP, 5, marker=False)
    victim = tmp_path / "victim"
    victim.write_text("x")
    age(victim, 5)
    (used / LAST_USE_NAME).symlink_to(victim)
    mark_used(used)
    assert time.time() - victim.stat().st_mtime > 4 * DAY


@pytest.mark.parametrize(("value", "pruned", "warned"), [
    ("1", True, False), ("0.5", True, False), ("3", False, False), ("never", False, False),
    ("NEVER", False, False), ("", False, True), ("soon", False, True), ("-1", False, True),
    ("nan", False, True), ("inf", False, True),
])
def test_the_environment_sets_the_retention_in_days(tmp_path: Path, value: str, pruned: bool,
                                                    warned: bool,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(RETENTION_ENV, value)
    used = entry(tmp_path, KEEP, None)
    entry(tmp_path, OLD, 2)
    stale = entry(tmp_path, ".build-q0q0q0q0", 2)      # staging left-overs go regardless
    with caplog.at_level(logging.WARNING, logger="vmshare.guest.retention"):
        use_entry(used)
    assert (tmp_path / OLD).exists() is not pruned
    assert not stale.exists()
    assert (RETENTION_ENV in caplog.text) is warned


# --- both builders prune their own cache -------------------------------------------

def test_the_busybox_builder_prunes_on_build_and_on_reuse(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-10-cloud-amd64").write_bytes(b"kernel")
    busybox = tmp_path / "busybox"
    header = bytearray(64)                     # ELF64 LE, no program headers: static
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 32, 64)
    struct.pack_into("<HH", header, 54, 56, 0)
    busybox.write_bytes(bytes(header))
    monkeypatch.setattr(builder, "_compiler_version", lambda cc: "cc 1.0")
    monkeypatch.setattr(builder, "compile_fill",
                        lambda src, out, cc="gcc": out.write_bytes(b"\x7fELF fill"))
    cache = tmp_path / "cache"
    entry(cache, OLD, 15, image=builder.INITRD_NAME)
    entry(cache, RECENT, 13, image=builder.INITRD_NAME)
    image = builder.build_image(cache, boot_dir=boot, busybox=busybox)
    key = image.initrd.parent.name
    assert sorted(p.name for p in cache.iterdir()) == sorted([key, RECENT])
    assert (cache / key / LAST_USE_NAME).is_file()

    age(cache / key / LAST_USE_NAME, 20)
    age(cache / RECENT, 1.5)
    age(cache / RECENT / LAST_USE_NAME, 1.5)
    built = image.initrd.stat().st_mtime_ns
    assert builder.build_image(cache, boot_dir=boot, busybox=busybox, retention_s=DAY) == image
    assert image.initrd.stat().st_mtime_ns == built                  # reused, not rebuilt
    assert [p.name for p in cache.iterdir()] == [key]
    assert time.time() - (cache / key / LAST_USE_NAME).stat().st_mtime < 60


def test_the_debian_builder_prunes_on_reuse_and_on_build(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    kernel = boot / "vmlinuz-6.1.0-10-cloud-amd64"
    kernel.write_bytes(b"kernel")
    (boot / "initrd.img-6.1.0-10-cloud-amd64").write_bytes(b"initrd")
    mirror = "http://deb.example/debian"
    cache = tmp_path / "debian"
    key = debian.image_key(mirror, kernel)
    entry(cache, key, 40)                      # a complete entry: reused, not built
    entry(cache, OLD, 15)
    entry(cache, RECENT, 13)

    def no_build(*args: object) -> None:
        raise AssertionError("the cached image was rebuilt")

    monkeypatch.setattr(debian, "_build_root", no_build)
    image = debian.build_debian_image(cache, boot_dir=boot, mirror=mirror)
    assert image.root == cache / key / "root.img"
    assert sorted(p.name for p in cache.iterdir()) == sorted([key, RECENT])
    assert time.time() - (cache / key / LAST_USE_NAME).stat().st_mtime < 60

    def fake_build(cache_dir: Path, final: Path, root: Path, mirror: str) -> None:
        final.mkdir()
        root.write_bytes(b"ext4")

    monkeypatch.setattr(debian, "_build_root", fake_build)
    (boot / "vmlinuz-6.1.0-11-cloud-amd64").write_bytes(b"upgraded kernel")
    (boot / "initrd.img-6.1.0-11-cloud-amd64").write_bytes(b"initrd")
    age(cache / key / LAST_USE_NAME, 3)
    upgraded = debian.build_debian_image(cache, boot_dir=boot, mirror=mirror,
                                         retention_s=2 * DAY)
    assert [p.name for p in cache.iterdir()] == [upgraded.root.parent.name]
    assert (upgraded.root.parent / LAST_USE_NAME).is_file()
