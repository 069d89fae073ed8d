"""ELF core dumps of guest memory (``virsh dump --memory-only --format elf``,
QMP ``dump-guest-memory`` with ``paging=false``).

Every header field is validated before it is trusted; see ``ElfCoreSource``.
Regions are the guest-physical ranges the PT_LOAD segments describe, with
physically adjacent page-aligned segments coalesced, keyed "gpa@0x<start>".
The kdump reader builds the same keys, so the two formats of one guest line
up. A PT_LOAD tail with ``p_memsz > p_filesz`` is a hole (not yielded).

QEMU 7.2 writes ``e_ehsize`` = 8 (a QEMU bug) and a section header table even
when it does not need one, so neither is validated beyond what is used.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmshare.engine.state import distinct
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
    page_ranges,
    pages_for,
)

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")   # Elf64_Ehdr, 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")           # Elf64_Phdr, 56 bytes
SHDR = struct.Struct("<IIQQQQIIQQ")         # Elf64_Shdr, 64 bytes
MAX_PHNUM = 1 << 20                         # QEMU writes one per guest RAM block
_PHDR_BATCH = 1024
U64 = 1 << 64


@dataclass(frozen=True)
class LoadSegment:
    index: int          # program header index
    offset: int         # p_offset
    paddr: int          # p_paddr (guest-physical)
    filesz: int
    memsz: int


@dataclass(frozen=True)
class _ElfRegion:
    region: Region
    start: int                          # guest-physical address of page 0
    segments: tuple[LoadSegment, ...]


class ElfCoreSource(FileSource):
    """Pages of an ELF64 little-endian ET_CORE guest memory dump.

    Validated at open (each failure is a DumpError naming the problem): magic,
    ELFCLASS64, little endian, ET_CORE, e_phentsize, the program header count
    (including the PN_XNUM extension through section header 0), the program
    header table lying inside the file, and for each PT_LOAD: offset+filesz
    neither overflowing 64 bits nor passing the end of the file, p_filesz <=
    p_memsz, guest-physical ranges that neither overflow nor overlap, and file
    ranges that do not overlap another PT_LOAD's.
    """

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        super().__init__(path, name)
        try:
            self.segments = self._parse()
            self._regions = self._build_regions(self.segments)
        except BaseException:
            self._fail_closed()
            raise

    # -- parsing -----------------------------------------------------------
    def _err(self, problem: str) -> DumpError:
        return DumpError(f"{self.path}: not a usable ELF core: {problem}")

    def _parse(self) -> list[LoadSegment]:
        if self.file_size < EHDR.size:
            if self.file_size >= 4 and self.read_bytes(0, 4, "ELF magic") != ELF_MAGIC:
                raise self._err("wrong magic (not an ELF file)")
            raise self._err(f"truncated ELF header ({self.file_size} bytes, need {EHDR.size})")
        (ident, e_type, _machine, _version, _entry, e_phoff, e_shoff, _flags, _ehsize,
         e_phentsize, e_phnum, e_shentsize, e_shnum, _shstrndx) = EHDR.unpack(
            self.read_bytes(0, EHDR.size, "ELF header"))
        if ident[:4] != ELF_MAGIC:
            raise self._err(f"wrong magic {ident[:4]!r} (not an ELF file)")
        if ident[4] != ELFCLASS64:
            cls = "ELFCLASS32" if ident[4] == ELFCLASS32 else f"class {ident[4]}"
            raise self._err(f"{cls} is not supported, need ELFCLASS64")
        if ident[5] != ELFDATA2LSB:
            raise self._err(f"data encoding {ident[5]} is not little endian (ELFDATA2LSB)")
        if e_type != ET_CORE:
            raise self._err(f"e_type {e_type} is not ET_CORE ({ET_CORE})")
        if e_phentsize != PHDR.size:
            raise self._err(f"e_phentsize {e_phentsize} != sizeof(Elf64_Phdr) {PHDR.size}")
        phnum = e_phnum
        if e_phnum == PN_XNUM:
            phnum = self._extended_phnum(e_shoff, e_shentsize, e_shnum)
        if phnum == 0:
            raise self._err("no program headers")
        if phnum > MAX_PHNUM:
            raise self._err(f"phnum {phnum} exceeds the limit of {MAX_PHNUM} program headers")
        table_end = e_phoff + phnum * PHDR.size
        if e_phoff < EHDR.size or table_end > self.file_size:
            raise self._err(f"program header table [{e_phoff:#x}, {table_end:#x}) is not "
                            f"inside the file ({self.file_size:#x} bytes)")

        loads: list[LoadSegment] = []
        for first in range(0, phnum, _PHDR_BATCH):
            count = min(_PHDR_BATCH, phnum - first)
            raw = self.read_bytes(e_phoff + first * PHDR.size, count * PHDR.size,
                                  "program headers")
            for k, fields in enumerate(PHDR.iter_unpack(raw)):
                p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = fields
                index = first + k
                if p_type == PT_NOTE:
                    self._check_file_range(index, "PT_NOTE", p_offset, p_filesz)
                elif p_type == PT_LOAD:
                    loads.append(self._check_load(index, p_offset, p_paddr, p_filesz, p_memsz))
        if not loads:
            raise self._err("no PT_LOAD segments (no guest memory in this dump)")
        self._check_overlaps(loads)
        return loads

    def _extended_phnum(self, e_shoff: int, e_shentsize: int, e_shnum: int) -> int:
        # PN_XNUM: the real count is sh_info of section header 0 (QEMU does this
        # when a guest has 65535 or more memory mappings).
        if e_shoff == 0:
            raise self._err("e_phnum is PN_XNUM but there is no section header 0 (e_shoff 0)")
        if e_shentsize != SHDR.size:
            raise self._err(f"e_shentsize {e_shentsize} != sizeof(Elf64_Shdr) {SHDR.size}")
        if e_shoff + SHDR.size > self.file_size:
            raise self._err(f"section header 0 at {e_shoff:#x} is past the end of the file")
        del e_shnum  # may itself be 0 (extended); section 0 exists either way
        return int(SHDR.unpack(self.read_bytes(e_shoff, SHDR.size, "section header 0"))[7])

    def _check_file_range(self, index: int, kind: str, offset: int, filesz: int) -> None:
        if filesz == 0:
            return
        end = offset + filesz
        if end >= U64:
            raise self._err(f"{kind} segment {index}: p_offset {offset:#x} + p_filesz "
                            f"{filesz:#x} overflows 64 bits")
        if end > self.file_size:
            raise self._err(f"{kind} segment {index}: file range [{offset:#x}, {end:#x}) is "
                            f"past the end of the file ({self.file_size:#x} bytes; truncated?)")

    def _check_load(self, index: int, offset: int, paddr: int, filesz: int,
                    memsz: int) -> LoadSegment:
        if filesz > memsz:
            raise self._err(f"PT_LOAD segment {index}: p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        # QEMU writes p_offset = -1 with p_filesz = 0 for memory it did not store.
        self._check_file_range(index, "PT_LOAD", offset, filesz)
        if paddr + memsz >= U64 + 1:
            raise self._err(f"PT_LOAD segment {index}: p_paddr {paddr:#x} + p_memsz {memsz:#x} "
                            f"overflows 64 bits")
        return LoadSegment(index, offset, paddr, filesz, memsz)

    def _check_overlaps(self, loads: list[LoadSegment]) -> None:
        stored = sorted((s for s in loads if s.filesz), key=lambda s: s.offset)
        for a, b in itertools.pairwise(stored):
            if b.offset < a.offset + a.filesz:
                raise self._err(f"PT_LOAD segments {a.index} and {b.index} overlap in the file "
                                f"([{a.offset:#x}, {a.offset + a.filesz:#x}) and "
                                f"[{b.offset:#x}, ...))")
        by_gpa = sorted((s for s in loads if s.memsz), key=lambda s: s.paddr)
        for a, b in itertools.pairwise(by_gpa):
            if b.paddr < a.paddr + a.memsz:
                raise self._err(f"PT_LOAD segments {a.index} and {b.index} overlap in "
                                f"guest-physical memory at {b.paddr:#x} (a paging=true dump? "
                                f"use paging=false)")

    def _build_regions(self, loads: list[LoadSegment]) -> list[_ElfRegion]:
        groups: list[list[LoadSegment]] = []
        for seg in sorted((s for s in loads if s.memsz), key=lambda s: s.paddr):
            aligned = seg.paddr % PAGE_SIZE == 0 and seg.memsz % PAGE_SIZE == 0
            if groups:
                last = groups[-1][-1]
                if (aligned and last.memsz % PAGE_SIZE == 0 and last.paddr % PAGE_SIZE == 0
                        and last.paddr + last.memsz == seg.paddr):
                    groups[-1].append(seg)
                    continue
            groups.append([seg])
        out = []
        for group in groups:
            start = group[0].paddr
            size = group[-1].paddr + group[-1].memsz - start
            region = Region(f"gpa@{start:#x}", pages_for(size) * PAGE_SIZE, self.file_generation)
            out.append(_ElfRegion(region, start, tuple(group)))
        return out

    # -- PageSource ----------------------------------------------------------
    def regions(self) -> list[Region]:
        return [r.region for r in self._regions]

    def stored_extents(self) -> list[tuple[str, int, int, int]]:
        return [(reg.region.key, (seg.paddr - reg.start) // PAGE_SIZE, seg.offset, seg.filesz)
                for reg in self._regions for seg in reg.segments if seg.filesz]

    def runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES, part: Part = WHOLE
             ) -> Iterator[PageRun]:
        """Stream the stored pages of every PT_LOAD, in guest-physical order.

        The yielded ``data`` lives in one buffer reused for the next run. A
        final partial page of a segment is zero-filled (ELF semantics).
        Raises DumpError if the file shrank since it was validated.
        """
        check_chunk_pages(chunk_pages)
        check_part(part)
        self._check_open()
        take = self.run_buffer(chunk_pages)
        step = chunk_pages * PAGE_SIZE
        index = 0
        for reg in self._regions:
            for seg in reg.segments:
                first = (seg.paddr - reg.start) // PAGE_SIZE
                for done in range(0, seg.filesz, step):
                    index += 1
                    if not mine(index, part):
                        continue
                    n = min(step, seg.filesz - done)
                    view = take(pages_for(n) * PAGE_SIZE)
                    self.read_stored(view, seg.offset + done, n, f"PT_LOAD segment {seg.index}")
                    yield PageRun(self.name, reg.region.key, first + done // PAGE_SIZE, view)

    def read_pages(self, region: str, pages: npt.NDArray[np.int64], into: memoryview) -> None:
        """Stored pages ``pages`` of ``region`` again (PageSource.read_pages);
        DumpError if the file shrank or a page is not stored."""
        self._check_open()
        check_into(into, pages)
        reg = next((r for r in self._regions if r.region.key == region), None)
        if reg is None:
            raise DumpError(f"{self.path}: no region {region!r}")
        firsts = np.array([(s.paddr - reg.start) // PAGE_SIZE for s in reg.segments],
                          dtype=np.int64)
        which = np.searchsorted(firsts, pages, side="right") - 1
        for w in distinct(which).tolist():            # ascending, as pages
            seg = reg.segments[max(w, 0)]
            sel = np.flatnonzero(which == w)
            for at, page, n in page_ranges(pages[sel] - firsts[max(w, 0)]):
                at = int(sel[at])
                dest = into[at * PAGE_SIZE:(at + n) * PAGE_SIZE]
                stored = min(len(dest), seg.filesz - page * PAGE_SIZE)
                if w < 0 or stored <= n * PAGE_SIZE - PAGE_SIZE:
                    raise DumpError(f"{self.path}: a page of {region} asked for is not "
                                    "stored in the dump")
                self.read_stored(dest, seg.offset + page * PAGE_SIZE, stored,
                                 f"PT_LOAD segment {seg.index}")
