"""kdump-compressed dumps (makedumpfile format; QMP ``dump-guest-memory``
with ``format: kdump-zlib|kdump-lzo|kdump-snappy``).

Layout (QEMU dump/dump.c, create_kdump_vmcore), in blocks of ``block_size``:
disk_dump_header (block 0), kdump_sub_header (+ ELF notes, ``sub_hdr_size``
blocks), the 1st and 2nd dump bitmaps (``bitmap_blocks`` together, one bit a
pfn, LSB first), one page_desc {offset u64, size u32, flags u32, page_flags
u64} per pfn set in the 2nd bitmap in pfn order, then the page data. QEMU
points every all-zero page at one shared uncompressed zero page.

QEMU 7.2 only writes the *flattened* variant (a "makedumpfile" header block,
then {offset, size} big-endian records each followed by its data, ended by a
{-1, -1} record; ``makedumpfile -R`` turns it into the plain layout). Both
are read here; the flattened one through an index of its records, gaps
reading as zeros as they would after ``-R``. The ``kdump-raw-*`` formats
(plain layout) arrived in QEMU 8.2.

Regions: one per contiguous run of pfns present in the 2nd bitmap, keyed
"gpa@0x<first byte>" like the ELF reader's, so dumps of one guest in either
format line up. Pages not in the 2nd bitmap are holes.
"""
# size: a few lines over 400: the format's validation, streaming and reading
# pages again (read_pages) share one per-page loader and its error messages.

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

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
    page_ranges,
)
from vmshare.sources.codecs import (
    CODEC_NAMES,
    DUMP_DH_COMPRESSED_INCOMPLETE,
    CodecError,
    Decompressor,
    decompressor,
)

KDUMP_SIGNATURE = b"KDUMP   "
MAKEDUMPFILE_SIGNATURE = b"makedumpfile"
MAX_SIZE_MDF_HEADER = 4096
# DiskDumpHeader64 (QEMU_PACKED): signature, header_version, utsname (6x65),
# timestamp[22], status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr,
# total_ram_blocks, device_blocks, written_blocks, current_cpu, nr_cpus.
DISK_DUMP_HEADER = struct.Struct("<8sI390s22sIIIIIIIIII")
# KdumpSubHeader64 (QEMU_PACKED)
KDUMP_SUB_HEADER = struct.Struct("<QIIQQQQQQQQQQQ")
PAGE_DESC = np.dtype([("offset", "<u8"), ("size", "<u4"), ("flags", "<u4"),
                      ("page_flags", "<u8")])
FLAT_RECORD = struct.Struct(">qq")
SUPPORTED_HEADER_VERSIONS = range(1, 7)
_BITMAP_CHUNK = 1 << 20            # bytes of bitmap scanned at a time
_DESC_BATCH = 4096                 # page descriptors read at a time


class _Plain:
    """A plain (seekable) kdump file: logical offset == file offset."""

    def __init__(self, src: FileSource) -> None:
        self.src = src
        self.size = src.file_size

    def read(self, buf: memoryview, offset: int, what: str) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise DumpError(f"{self.src.path}: {what} [{offset:#x}, {offset + len(buf):#x}) is "
                            f"outside the file ({self.size:#x} bytes)")
        self.src.pread_exact(buf, offset, what)


class _Flattened:
    """The flattened makedumpfile stream, indexed by logical offset."""

    def __init__(self, src: FileSource) -> None:
        self.src = src
        path = src.path
        starts: list[int] = []
        lengths: list[int] = []
        filepos: list[int] = []
        pos = MAX_SIZE_MDF_HEADER
        head = bytearray(FLAT_RECORD.size)
        hv = memoryview(head)
        while True:
            if pos + FLAT_RECORD.size > src.file_size:
                raise DumpError(f"{path}: flattened kdump truncated: no end marker "
                                f"(stream ends at file offset {pos:#x})")
            src.pread_exact(hv, pos, "flattened record header")
            offset, size = FLAT_RECORD.unpack(head)
            if offset == -1 and size == -1:
                break
            if offset < 0 or size < 0:
                raise DumpError(f"{path}: flattened record at file offset {pos:#x} has a "
                                f"negative offset or size ({offset}, {size})")
            if pos + FLAT_RECORD.size + size > src.file_size:
                raise DumpError(f"{path}: flattened record at file offset {pos:#x} is truncated "
                                f"({size} bytes announced, file ends at {src.file_size:#x})")
            if size:
                starts.append(offset)
                lengths.append(size)
                filepos.append(pos + FLAT_RECORD.size)
            pos += FLAT_RECORD.size + size
        order = np.argsort(np.array(starts, dtype=np.uint64), kind="stable")
        self.starts = np.array(starts, dtype=np.uint64)[order]
        self.ends = self.starts + np.array(lengths, dtype=np.uint64)[order]
        self.filepos = np.array(filepos, dtype=np.uint64)[order]
        if len(self.starts) > 1:
            bad = np.nonzero(self.starts[1:] < self.ends[:-1])[0]
            if len(bad):
                at = int(self.starts[int(bad[0]) + 1])
                raise DumpError(f"{path}: flattened records overlap at logical offset {at:#x}")
        self.size = int(self.ends[-1]) if len(self.ends) else 0

    def read(self, buf: memoryview, offset: int, what: str) -> None:
        end = offset + len(buf)
        if offset < 0 or end > self.size:
            raise DumpError(f"{self.src.path}: {what} [{offset:#x}, {end:#x}) is outside the "
                            f"file ({self.size:#x} bytes once unflattened)")
        i = int(np.searchsorted(self.ends, offset, side="right"))
        pos = offset
        n = len(self.starts)
        while pos < end:
            if i < n and int(self.starts[i]) <= pos:
                take = min(end, int(self.ends[i])) - pos
                self.src.pread_exact(buf[pos - offset:pos - offset + take],
                                     int(self.filepos[i]) + pos - int(self.starts[i]), what)
                pos += take
                i += 1
            else:
                stop = min(end, int(self.starts[i])) if i < n else end
                buf[pos - offset:stop - offset] = bytes(stop - pos)
                pos = stop


@dataclass(frozen=True)
class _PfnRun:
    first_pfn: int
    npages: int
    first_desc: int         # index of the page_desc of first_pfn


class KdumpSource(FileSource):
    """Pages of a kdump-compressed dump (plain or flattened).

    Validated at open: the signature ("KDUMP   ", or the "makedumpfile"
    flattened header and every record in the stream), header_version,
    block_size (must be the 4 KiB page size), sub_hdr_size, bitmap_blocks
    (even, large enough for max_mapnr, inside the file), the incomplete-dump
    flag, the compression codec being available, the page descriptor table
    lying inside the file. Validated per page while streaming, failing with
    a DumpError naming the pfn: descriptor data outside the file, a size of 0
    or above block_size, an uncompressed page whose size is not block_size,
    unknown compression flags, data that does not decompress to exactly
    block_size bytes.
    """

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        super().__init__(path, name)
        try:
            self._open()
        except BaseException:
            self._fail_closed()
            raise

    def _err(self, problem: str) -> DumpError:
        return DumpError(f"{self.path}: not a usable kdump-compressed dump: {problem}")

    def _open(self) -> None:
        if self.file_size < len(KDUMP_SIGNATURE):
            raise self._err(f"truncated: {self.file_size} bytes, too short for a header")
        head = self.read_bytes(0, min(self.file_size, 32), "signature")
        self.flattened = head.startswith(MAKEDUMPFILE_SIGNATURE + b"\0")
        if self.flattened:
            if len(head) < 32:
                raise self._err(f"truncated: {self.file_size} bytes, too short for the "
                                "flattened makedumpfile header")
            mdf_type, mdf_version = struct.unpack_from(">qq", head, 16)
            if (mdf_type, mdf_version) != (1, 1):
                raise self._err(f"flattened header type {mdf_type} version {mdf_version} "
                                "unsupported (need 1, 1)")
            self.layout: _Plain | _Flattened = _Flattened(self)
        elif head[:8] == KDUMP_SIGNATURE:
            self.layout = _Plain(self)
        else:
            raise self._err(f"bad signature {head[:8]!r} (expected {KDUMP_SIGNATURE!r} or a "
                            f"flattened {MAKEDUMPFILE_SIGNATURE.decode()!r} stream)")
        if self.layout.size < DISK_DUMP_HEADER.size:
            raise self._err("truncated disk_dump_header")
        dh = self._read(0, DISK_DUMP_HEADER.size, "disk_dump_header")
        (sig, version, _uts, _ts, status, block_size, sub_hdr_size, bitmap_blocks,
         max_mapnr32, *_rest) = DISK_DUMP_HEADER.unpack(dh)
        if sig != KDUMP_SIGNATURE:
            raise self._err(f"bad signature {sig!r} in disk_dump_header")
        if version not in SUPPORTED_HEADER_VERSIONS:
            raise self._err(f"header_version {version} unsupported (1..6; a big-endian dump?)")
        if block_size != PAGE_SIZE:
            raise self._err(f"block_size {block_size} unsupported (pages are {PAGE_SIZE} bytes)")
        if status & DUMP_DH_COMPRESSED_INCOMPLETE:
            raise self._err("the dump is marked incomplete (the writer ran out of space)")
        self.block_size = block_size
        max_mapnr = max_mapnr32
        if version >= 6:
            if sub_hdr_size * block_size < KDUMP_SUB_HEADER.size:
                raise self._err(f"sub_hdr_size {sub_hdr_size} blocks cannot hold the "
                                f"kdump_sub_header")
            sub = KDUMP_SUB_HEADER.unpack(self._read(block_size, KDUMP_SUB_HEADER.size,
                                                     "kdump_sub_header"))
            max_mapnr = sub[13]
        if bitmap_blocks % 2:
            raise self._err(f"bitmap_blocks {bitmap_blocks} is odd (two equal bitmaps expected)")
        bitmap_len = bitmap_blocks // 2 * block_size
        if max_mapnr > bitmap_len * 8:
            raise self._err(f"max_mapnr {max_mapnr} exceeds the bitmap's "
                            f"{bitmap_len * 8} bits")
        self.max_mapnr = max_mapnr
        self.bitmap2_offset = (1 + sub_hdr_size) * block_size + bitmap_len
        self.desc_offset = self.bitmap2_offset + bitmap_len
        if self.desc_offset > self.layout.size:
            raise self._err(f"bitmap [{(1 + sub_hdr_size) * block_size:#x}, "
                            f"{self.desc_offset:#x}) is past the end of the file "
                            f"({self.layout.size:#x} bytes)")
        for flag in CODEC_NAMES:
            if status & flag:
                decompressor(flag)     # fails early, naming a missing codec
        self._pfn_runs, ndesc = self._scan_bitmap()
        self.ndesc = ndesc
        self.data_offset = self.desc_offset + ndesc * PAGE_DESC.itemsize
        if self.data_offset > self.layout.size:
            raise self._err(f"page descriptor table ({ndesc} descriptors, ending at "
                            f"{self.data_offset:#x}) is past the end of the file "
                            f"({self.layout.size:#x} bytes)")
        self._regions = [Region(f"gpa@{r.first_pfn * PAGE_SIZE:#x}", r.npages * PAGE_SIZE,
                                self.file_generation) for r in self._pfn_runs]

    def _read(self, offset: int, size: int, what: str) -> bytes:
        buf = bytearray(size)
        self.layout.read(memoryview(buf), offset, what)
        return bytes(buf)

    def _scan_bitmap(self) -> tuple[list[_PfnRun], int]:
        """Runs of set bits in the 2nd bitmap (pfn < max_mapnr), and their total."""
        runs: list[_PfnRun] = []
        total = 0

        def add(first: int, stop: int) -> None:
            nonlocal total
            runs.append(_PfnRun(first, stop - first, total))
            total += stop - first

        open_start = -1                 # first pfn of a run still open at a chunk edge
        nbytes = (self.max_mapnr + 7) // 8
        buf = bytearray(min(_BITMAP_CHUNK, max(nbytes, 1)))
        for byte0 in range(0, nbytes, len(buf)):
            n = min(len(buf), nbytes - byte0)
            view = memoryview(buf)[:n]
            self.layout.read(view, self.bitmap2_offset + byte0, "2nd dump bitmap")
            pfn0 = byte0 * 8
            bits = np.unpackbits(np.frombuffer(view, dtype=np.uint8), bitorder="little")
            bits = bits[:self.max_mapnr - pfn0].astype(np.int8)
            edges = np.diff(bits, prepend=np.int8(1 if open_start >= 0 else 0))
            starts = (np.nonzero(edges == 1)[0] + pfn0).tolist()
            stops = (np.nonzero(edges == -1)[0] + pfn0).tolist()
            if open_start >= 0:
                starts.insert(0, open_start)
            for first, stop in zip(starts, stops, strict=False):
                add(first, stop)
            open_start = starts[-1] if len(starts) > len(stops) else -1
        if open_start >= 0:
            add(open_start, self.max_mapnr)
        return runs, total

    # -- PageSource ----------------------------------------------------------
    def regions(self) -> list[Region]:
        return list(self._regions)

    def runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES, part: Part = WHOLE
             ) -> Iterator[PageRun]:
        """Stream every dumped page, in pfn order, decompressing as needed, into
        one buffer reused for the next run (or ``read_into``'s); one reader (a
        part other than the first gets nothing). Raises DumpError naming the
        pfn for a bad page descriptor or page data."""
        check_chunk_pages(chunk_pages)
        if check_part(part)[0]:
            return
        self._check_open()
        bs, take = self.block_size, self.run_buffer(chunk_pages)
        scratchv = memoryview(bytearray(bs))
        descbuf = bytearray(_DESC_BATCH * PAGE_DESC.itemsize)
        shared: dict[int, bytes] = {}      # QEMU's shared zero page, read once
        codecs: dict[int, Decompressor] = {}
        for run, region in zip(self._pfn_runs, self._regions, strict=True):
            filled = first_in_buf = 0
            outv: memoryview | None = None
            for batch0 in range(0, run.npages, _DESC_BATCH):
                count = min(_DESC_BATCH, run.npages - batch0)
                dv = memoryview(descbuf)[:count * PAGE_DESC.itemsize]
                self.layout.read(dv, self.desc_offset + (run.first_desc + batch0) *
                                 PAGE_DESC.itemsize, "page descriptors")
                descs = np.frombuffer(dv, dtype=PAGE_DESC)
                offs = descs["offset"].tolist()
                sizes = descs["size"].tolist()
                flags = descs["flags"].tolist()
                for k in range(count):
                    if outv is None:
                        outv = take(min(chunk_pages, run.npages - first_in_buf) * bs)
                    self._load_page(run.first_pfn + batch0 + k, offs[k], sizes[k], flags[k],
                                    outv[filled * bs:(filled + 1) * bs], scratchv,
                                    shared, codecs)
                    filled += 1
                    if filled * bs == len(outv):
                        yield PageRun(self.name, region.key, first_in_buf, outv)
                        first_in_buf += filled
                        filled, outv = 0, None

    def read_pages(self, region: str, pages: npt.NDArray[np.int64], into: memoryview) -> None:
        """Pages ``pages`` of ``region`` again, decompressed (PageSource.read_pages);
        the descriptors of consecutive pages in one read. Raises as ``runs``."""
        self._check_open()
        check_into(into, pages)
        k = next((i for i, r in enumerate(self._regions) if r.key == region), None)
        if k is None:
            raise DumpError(f"{self.path}: no region {region!r}")
        run, bs, scratch = self._pfn_runs[k], self.block_size, memoryview(bytearray(PAGE_SIZE))
        shared: dict[int, bytes] = {}
        codecs: dict[int, Decompressor] = {}
        for at, page, n in page_ranges(pages):
            dv = memoryview(bytearray(n * PAGE_DESC.itemsize))
            self.layout.read(dv, self.desc_offset + (run.first_desc + page) *
                             PAGE_DESC.itemsize, "page descriptors")
            d = np.frombuffer(dv, dtype=PAGE_DESC)
            for j, (off, size, flags) in enumerate(zip(*(d[f].tolist() for f in (
                    "offset", "size", "flags")), strict=True)):
                self._load_page(run.first_pfn + page + j, off, size, flags,
                                into[(at + j) * bs:(at + j + 1) * bs], scratch, shared, codecs)

    def _load_page(self, pfn: int, offset: int, size: int, flags: int, dest: memoryview,
                   scratch: memoryview, shared: dict[int, bytes],
                   codecs: dict[int, Decompressor]) -> None:
        bs = self.block_size
        what = f"page data of pfn {pfn:#x}"
        if size == 0 or size > bs:
            raise self._err(f"pfn {pfn:#x}: page descriptor size {size} is "
                            f"{'zero' if size == 0 else f'> block_size {bs}'}")
        if offset + size > self.layout.size or offset < self.data_offset:
            raise self._err(f"pfn {pfn:#x}: page descriptor points outside the file's page "
                            f"data ([{offset:#x}, {offset + size:#x}) vs "
                            f"[{self.data_offset:#x}, {self.layout.size:#x}))")
        if flags == 0:
            if size != bs:
                raise self._err(f"pfn {pfn:#x}: uncompressed page of size {size} != "
                                f"block_size {bs}")
            if offset == self.data_offset:
                cached = shared.get(offset)
                if cached is None:
                    self.layout.read(dest, offset, what)
                    shared[offset] = bytes(dest)
                else:
                    dest[:] = cached
                return
            self.layout.read(dest, offset, what)
            return
        codec = codecs.get(flags)
        if codec is None:
            if flags not in CODEC_NAMES:
                raise self._err(f"pfn {pfn:#x}: unknown compression flags {flags:#x}")
            try:
                codec = decompressor(flags)
            except DumpError as exc:
                raise self._err(f"pfn {pfn:#x}: {exc}") from exc
            codecs[flags] = codec
        data = scratch[:size]
        self.layout.read(data, offset, what)
        try:
            page = codec(bytes(data), bs)
        except CodecError as exc:
            raise self._err(f"pfn {pfn:#x}: {CODEC_NAMES[flags]} data is corrupt "
                            f"(decompression failed: {exc})") from exc
        if len(page) != bs:
            raise self._err(f"pfn {pfn:#x}: {CODEC_NAMES[flags]} data decompresses to "
                            f"{len(page)} bytes, expected block_size {bs}")
        dest[:] = page


def looks_like_kdump(head: bytes) -> bool:
    """True if ``head`` (the first bytes of a file) starts a kdump or flattened stream."""
    return head.startswith(KDUMP_SIGNATURE) or head.startswith(MAKEDUMPFILE_SIGNATURE + b"\0")


