"""Build a cache entry in a staging directory and rename it into place.

Both guest builders (the busybox initramfs and the Debian root disk) keep
content-addressed images in a cache that several processes may fill at once
(the demo, the test suite, a second test run). Each builds in its own
``.build-*`` directory inside the cache and renames it to the final name in
one step, so a reader never sees half an image, and a builder that loses the
race to an identical image keeps the winner's. ``retention`` removes the
``.build-*`` directories a killed builder leaves, and entries long unused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vmshare.errors import ImageBuildError


def prepare_cache(cache_dir: Path) -> None:
    """Create ``cache_dir`` (mode 0700). Raises ImageBuildError when it cannot."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(cache_dir, 0o700)
    except OSError as exc:
        raise ImageBuildError(f"cannot create image cache {cache_dir}: {exc}") from exc


@contextmanager
def staged(cache_dir: Path, final: Path, prefix: str, complete: Callable[[], bool],
           what: str) -> Iterator[Path]:
    """Yield a fresh staging directory in ``cache_dir``; on a clean exit rename
    it to ``final``. If the rename fails because a concurrent builder got there
    first, ``complete()`` says whether its image is whole (then it is kept).
    The staging directory never outlives the block.

    Raises ImageBuildError (naming ``what``) on any OSError in the block or the
    rename; other exceptions from the block pass through after the clean-up.
    """
    try:
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=prefix))
    except OSError as exc:
        raise ImageBuildError(f"cannot write to image cache {cache_dir}: {exc}") from exc
    try:
        yield staging
        try:
            os.rename(staging, final)
        except OSError:
            if not complete():      # a concurrent builder did not win either
                raise
    except OSError as exc:
        raise ImageBuildError(f"writing {what} to {final} failed: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
