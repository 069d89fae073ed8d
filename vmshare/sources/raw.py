"""Raw guest RAM images (QMP/HMP ``pmemsave``, or any plain file of RAM)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from vmshare.errors import DumpError
from vmshare.model import PAGE_SIZE, PageRun, Region
from vmshare.sources.base import (
    DEFAULT_CHUNK_PAGES,
    WHOLE,
    FileSource,
    Part,
    check_chunk_pages,
    check_into,
    check_part,
    mine,
    pages_for,
    pread_pages,
)


class RawImageSource(FileSource):
    """A file whose byte ``i`` is guest RAM byte ``base + i``: one region.

    The region key is "gpa@0x<base>" (``base`` is the guest-physical address
    the image starts at, 0 for ``pmemsave val=0``) unless ``key`` is given.
    A file whose size is not a page multiple gets its last page zero-filled.
    There is nothing to validate beyond the file being a readable regular
    file or block device (a FIFO or character device raises DumpError at
    once); a file that shrinks while it is read raises DumpError.
    """

    def __init__(self, path: str | os.PathLike[str], name: str | None = None, *,
                 base: int = 0, key: str | None = None) -> None:
        super().__init__(path, name)
        self.base = base
        self.key = key if key is not None else f"gpa@{base:#x}"

    def regions(self) -> list[Region]:
        if self.file_size == 0:
            return []
        return [Region(self.key, pages_for(self.file_size) * PAGE_SIZE, self.file_generation)]

    def stored_extents(self) -> list[tuple[str, int, int, int]]:
        return [(self.key, 0, 0, self.file_size)] if self.file_size else []

    def runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES, part: Part = WHOLE
             ) -> Iterator[PageRun]:
        """Stream the whole file; ``data`` lives in one buffer reused between
        yields (or where ``read_into`` says)."""
        check_chunk_pages(chunk_pages)
        check_part(part)
        self._check_open()
        take = self.run_buffer(chunk_pages)
        step = chunk_pages * PAGE_SIZE
        for index, done in enumerate(range(0, self.file_size, step)):
            if not mine(index, part):
                continue
            n = min(step, self.file_size - done)
            view = take(pages_for(n) * PAGE_SIZE)
            self.read_stored(view, done, n, "raw image")
            yield PageRun(self.name, self.key, done // PAGE_SIZE, view)

    def read_pages(self, region: str, pages: npt.NDArray[np.int64], into: memoryview) -> None:
        """Pages ``pages`` of the image again (PageSource.read_pages); DumpError
        if the file shrank."""
        self._check_open()
        check_into(into, pages)
        if region != self.key:
            raise DumpError(f"{self.path}: no region {region!r}")
        pread_pages(self._fd, 0, pages, into, lambda view, off: self.read_stored(
            view, off, max(0, min(len(view), self.file_size - off)), "raw image"))
