"""Keep the guest image caches from growing without bound.

Both image caches (the busybox guest's, the Debian root disk's) are keyed by
their inputs, so every kernel upgrade, layout bump or package change makes a
new entry and leaves the old one behind (a Debian root disk is 268 MiB to
1 GiB). Each use of an image refreshes a marker file in its entry
(``LAST_USE_NAME``); then ``use_entry`` removes the cache's other entries not
used for the retention (``RETENTION_S``, or ``RETENTION_ENV`` in days) and
staging directories a killed builder left (older than ``STAGING_MAX_AGE_S``).

The marker, not the image, carries the time: QEMU and the overlays read the
image (atime is unreliable under noatime/relatime, and the image's own mtime
is its build time). Only names of the cache's own shapes are touched (an entry
is ``KEY_HEX_LENGTH`` hex digits, a staging directory ``.build-...``), only
real directories (never through a symlink), and never the entry just used.

An image a running guest holds open may still be removed: on Linux the
unlinked file lives on until QEMU closes it, so the guest runs on. Its entry
is refreshed on every use by the demo and the suite, so only an image nothing
has started from for the whole retention can go; what such a guest loses is
a restart from its overlay (the overlay names the backing file by path).

Pruning never fails a build: every OSError is logged and the entry kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import stat
import time
from pathlib import Path

log = logging.getLogger("vmshare.guest.retention")

#: length of a cache key: the first hex digits of the inputs' SHA-256
KEY_HEX_LENGTH = 24
#: entries not used for this long are removed (14 days)
RETENTION_S = 14 * 86400.0
#: the retention in days; "never" keeps every entry (staging left-overs still go)
RETENTION_ENV = "VMSHARE_IMAGE_RETENTION_DAYS"
#: a staging directory this old belongs to a builder that was killed (a live
#: build writes into it for minutes at most: BUILD_TIMEOUT_S per step)
STAGING_MAX_AGE_S = 86400.0
#: the file in an entry whose mtime is the entry's last use
LAST_USE_NAME = ".last-use"
STAGING_PREFIX = ".build-"

_ENTRY = re.compile(rf"[0-9a-f]{{{KEY_HEX_LENGTH}}}")
# builder.py names its staging ".build-<key>-", debian.py ".build-"; tempfile
# adds lower-case letters, digits and underscores
_STAGING = re.compile(rf"{re.escape(STAGING_PREFIX)}(?:[0-9a-f]{{{KEY_HEX_LENGTH}}}-)?"
                      r"[a-z0-9_]+")


def retention_from_env() -> float:
    """The retention in seconds: ``RETENTION_ENV`` in days, ``RETENTION_S``
    when it is unset, infinite (no entry pruned) for "never" or for a value
    that is not a finite number of days of 0 or more (logged as a warning:
    removing images by a default the operator tried to replace would be
    worse than keeping them)."""
    raw = os.environ.get(RETENTION_ENV)
    if raw is None:
        return RETENTION_S
    if raw.strip().lower() == "never":
        return math.inf
    try:
        days = float(raw)
    except ValueError:
        days = math.nan
    if not (math.isfinite(days) and days >= 0):
        log.warning("%s=%r is not a number of days (0 or more) or 'never': "
                    "no guest image pruned", RETENTION_ENV, raw[:40])
        return math.inf
    return days * 86400.0


def mark_used(entry: Path) -> None:
    """Set the last use of the cache entry ``entry`` to now (an OSError is
    logged: a cache that cannot record a use still serves the image)."""
    marker = entry / LAST_USE_NAME
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.utime(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot record the use of guest image %s: %s", entry, exc)


def use_entry(entry: Path, retention_s: float | None = None) -> int:
    """Record a use of ``entry`` and prune its cache (the parent directory),
    keeping ``entry``. ``retention_s`` None: ``retention_from_env()``.
    Returns the bytes freed. Never raises OSError."""
    mark_used(entry)
    retention = retention_from_env() if retention_s is None else retention_s
    return prune_cache(entry.parent, keep=entry.name, retention_s=retention)


def last_use(entry: Path) -> float:
    """When ``entry`` (a directory, not followed if a symlink) was last used:
    its marker's mtime, or, for an entry made before markers or never marked,
    the directory's (its build). The later of the two. Raises OSError."""
    times = [os.lstat(entry).st_mtime]
    with contextlib.suppress(FileNotFoundError):
        times.append(os.lstat(entry / LAST_USE_NAME).st_mtime)
    return max(times)


def prune_cache(cache_dir: Path, *, keep: str, retention_s: float = RETENTION_S,
                staging_max_age_s: float = STAGING_MAX_AGE_S) -> int:
    """Remove from ``cache_dir`` the entries other than ``keep`` last used
    more than ``retention_s`` ago and staging directories older than
    ``staging_max_age_s``; leave every other name, and symlinks, alone.
    Returns the bytes freed. Never raises OSError (each is logged)."""
    try:
        with os.scandir(cache_dir) as it:
            names = sorted(e.name for e in it)
    except OSError as exc:
        log.warning("cannot list guest image cache %s: %s", cache_dir, exc)
        return 0
    now = time.time()
    freed = 0
    for name in names:
        path = cache_dir / name
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode) or name == keep:
                continue
            if _ENTRY.fullmatch(name):
                age, limit, what = now - last_use(path), retention_s, "last used"
            elif _STAGING.fullmatch(name):
                age, limit, what = now - os.lstat(path).st_mtime, staging_max_age_s, "left"
            else:
                continue
            if age > limit:
                freed += _remove(path, f"{what} {age / 86400:.1f} days ago")
        except OSError as exc:
            log.warning("cannot prune %s from the guest image cache: %s", path, exc)
    return freed


def _remove(path: Path, why: str) -> int:
    """Remove the directory ``path`` (rmtree never follows a symlink inside
    it); return its disk usage. Raises OSError."""
    size = _disk_usage(path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return 0                  # a concurrent builder pruned it first
    log.info("guest image cache: removed %s (%s), %.1f MiB freed", path, why, size / 2**20)
    return size


def _disk_usage(root: Path) -> int:
    total = 0
    for parent, dirs, files in os.walk(root, followlinks=False):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total
