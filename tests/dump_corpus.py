"""Builds small guest memory dumps with known page content, valid and malformed.

ELF cores are laid out like QEMU's (ELF header, PT_NOTE, PT_LOADs, notes,
memory); kdump files like QEMU's create_kdump_vmcore (header block, sub
header, two equal bitmaps, one page_desc per dumped pfn, the shared zero
page first in the data, zlib pages at Z_BEST_SPEED or raw when that does not
shrink them), in the plain or the flattened ("makedumpfile") layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PAGE = 4096
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
PT_LOAD, PT_NOTE = 1, 4
DISK_DUMP_HEADER = struct.Struct("<8sI390s22sIIIIIIIIII")
KDUMP_SUB_HEADER = struct.Struct("<QIIQQQQQQQQQQQ")
PAGE_DESC = struct.Struct("<QIIQ")


def page(seed: int) -> bytes:
    """A page whose content depends on ``seed`` only (compressible)."""
    return (struct.pack("<Q", seed) * 16 + bytes(range(128)) * 3)[: PAGE // 8] * 8


def noise_page(seed: int) -> bytes:
    """A page zlib cannot shrink (stored raw in kdump)."""
    out = b""
    block = seed.to_bytes(8, "little")
    while len(out) < PAGE:
        block = hashlib.sha256(block).digest()
        out += block
    return out[:PAGE]


ZERO = bytes(PAGE)


# ---------------------------------------------------------------- ELF ----
@dataclass
class Seg:
    paddr: int
    data: bytes                 # p_filesz bytes stored in the file
    memsz: int | None = None    # default len(data)
    offset: int | None = None   # override p_offset
    filesz: int | None = None   # override p_filesz


@dataclass
class ElfSpec:
    segs: list[Seg]
    ident_class: int = 2
    ident_data: int = 1
    e_type: int = 4
    phentsize: int = PHDR.size
    phoff: int | None = None
    xnum: bool = False          # PN_XNUM with the count in section 0
    xnum_section: bool = True
    note: bytes = field(default=b"\x05\x00\x00\x00\x10\x00\x00\x00\x01\x00\x00\x00CORE\x00"
                                  b"\x00\x00\x00" + bytes(16))


def build_elf(spec: ElfSpec) -> bytes:
    nph = len(spec.segs) + 1
    phoff = EHDR.size
    shoff = phoff + nph * PHDR.size if spec.xnum and spec.xnum_section else 0
    note_off = phoff + nph * PHDR.size + (SHDR.size if shoff else 0)
    mem_off = note_off + len(spec.note)
    mem_off = (mem_off + 15) // 16 * 16
    ehdr = EHDR.pack(b"\x7fELF" + bytes([spec.ident_class, spec.ident_data, 1]) + bytes(9),
                     spec.e_type, 62, 1, 0, spec.phoff if spec.phoff is not None else phoff,
                     shoff, 0, 8, spec.phentsize, 0xFFFF if spec.xnum else nph,
                     SHDR.size if shoff else 0, 1 if shoff else 0, 0)
    phdrs = [PHDR.pack(PT_NOTE, 0, note_off, 0, 0, len(spec.note), len(spec.note), 0)]
    body = b""
    for s in spec.segs:
        off = s.offset if s.offset is not None else mem_off + len(body)
        filesz = s.filesz if s.filesz is not None else len(s.data)
        memsz = s.memsz if s.memsz is not None else len(s.data)
        phdrs.append(PHDR.pack(PT_LOAD, 0, off, s.paddr, s.paddr, filesz, memsz, 0))
        if s.offset is None:
            body += s.data
    out = bytearray(ehdr + b"".join(phdrs))
    if shoff:
        out += SHDR.pack(0, 0, 0, 0, 0, 0, 0, nph, 0, 0)
    out += spec.note
    out += bytes(mem_off - len(out))
    out += body
    return bytes(out)


def valid_elf_spec() -> tuple[ElfSpec, dict[tuple[str, int], bytes]]:
    """Three segments: two physically adjacent (one region), one apart; a hole tail."""
    a = [page(1), page(2), ZERO]
    b = [page(3), page(1)]           # a duplicate of page(1)
    c = [noise_page(7), page(9)]
    spec = ElfSpec([Seg(0, b"".join(a)),
                    Seg(3 * PAGE, b"".join(b), memsz=3 * PAGE),    # last page: hole
                    Seg(0x100000, b"".join(c))])
    expect = {("gpa@0x0", i): p for i, p in enumerate(a + b)}
    expect.update({("gpa@0x100000", i): p for i, p in enumerate(c)})
    return spec, expect


# -------------------------------------------------------------- kdump ----
@dataclass
class KdumpSpec:
    pages: dict[int, bytes]
    max_mapnr: int
    flattened: bool = True
    signature: bytes = b"KDUMP   "
    header_version: int = 6
    block_size: int = PAGE
    status: int = 1
    bitmap_blocks: int | None = None
    # Tamper hooks: pfn -> dict of page_desc fields to override / data to store.
    desc_override: dict[int, dict[str, int]] = field(default_factory=dict)
    data_override: dict[int, bytes] = field(default_factory=dict)
    truncate_logical: int | None = None     # cut the logical file at this size
    drop_end_marker: bool = False
    overlap_record: bool = False


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def build_kdump(spec: KdumpSpec) -> bytes:
    """Return the file bytes (flattened or plain)."""
    bs = spec.block_size
    note = b"\0" * 64
    sub_hdr_blocks = _ceil_div(KDUMP_SUB_HEADER.size + len(note), bs)
    bitmap_len = _ceil_div(_ceil_div(spec.max_mapnr, 8), bs) * bs
    bitmap_blocks = (spec.bitmap_blocks if spec.bitmap_blocks is not None
                     else bitmap_len // bs * 2)
    dh = DISK_DUMP_HEADER.pack(spec.signature, spec.header_version, b"Linux".ljust(390, b"\0"),
                               bytes(22), spec.status, bs, sub_hdr_blocks, bitmap_blocks,
                               spec.max_mapnr, 0, 0, 0, 0, 1)
    kh = KDUMP_SUB_HEADER.pack(0, 1, 0, 0, 0, 0, 0, bs + KDUMP_SUB_HEADER.size, len(note),
                               0, 0, 0, 0, spec.max_mapnr)
    records: list[tuple[int, bytes]] = [(0, dh), (bs, kh + note)]
    bitmap = bytearray(bitmap_len)
    for pfn in spec.pages:
        bitmap[pfn // 8] |= 1 << (pfn % 8)
    bm_off = (1 + sub_hdr_blocks) * bs
    records.append((bm_off, bytes(bitmap)))
    records.append((bm_off + bitmap_len, bytes(bitmap)))
    desc_off = bm_off + 2 * bitmap_len
    pfns = sorted(spec.pages)
    data_off = desc_off + PAGE_DESC.size * len(pfns)
    data = bytearray(ZERO[:bs])               # QEMU's shared zero page
    zero_desc = {"offset": data_off, "size": bs, "flags": 0, "page_flags": 0}
    descs = b""
    for pfn in pfns:
        content = spec.pages[pfn]
        if content == ZERO[:bs]:
            d = dict(zero_desc)
        else:
            packed = zlib.compress(content, 1)
            if len(packed) < bs:
                d = {"offset": data_off + len(data), "size": len(packed), "flags": 1,
                     "page_flags": 0}
                stored = packed
            else:
                d = {"offset": data_off + len(data), "size": bs, "flags": 0, "page_flags": 0}
                stored = content
            stored = spec.data_override.get(pfn, stored)
            if pfn in spec.data_override:
                d["size"] = len(stored)
            data += stored
        d.update(spec.desc_override.get(pfn, {}))
        descs += PAGE_DESC.pack(d["offset"], d["size"], d["flags"], d["page_flags"])
    records.append((desc_off, descs))
    # QEMU writes page data through a 4-page cache: records of at most 16 KiB.
    for i in range(0, len(data), 4 * bs):
        records.append((data_off + i, bytes(data[i:i + 4 * bs])))
    if spec.truncate_logical is not None:
        cut = spec.truncate_logical
        records = [(o, b[: max(0, cut - o)]) for o, b in records if o < cut]
    if spec.flattened:
        out = bytearray(b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1))
        out += bytes(4096 - len(out))
        if spec.overlap_record:
            records.append((8, b"overlapping"))
        for off, blob in records:
            out += struct.pack(">qq", off, len(blob)) + blob
        if not spec.drop_end_marker:
            out += struct.pack(">qq", -1, -1)
        return bytes(out)
    size = max(o + len(b) for o, b in records)
    plain = bytearray(size)
    for off, blob in records:
        plain[off:off + len(blob)] = blob
    return bytes(plain)


def valid_kdump_pages() -> dict[int, bytes]:
    return {0: page(1), 1: page(2), 2: page(1), 5: ZERO, 6: noise_page(3),
            100: page(4), 101: ZERO, 102: page(5), 103: noise_page(4), 199: page(6)}


def kdump_expect(pages: dict[int, bytes]) -> dict[tuple[str, int], bytes]:
    """(region key, page index) -> content for contiguous pfn runs."""
    out: dict[tuple[str, int], bytes] = {}
    start = None
    prev = None
    for pfn in sorted(pages):
        if prev is None or pfn != prev + 1:
            start = pfn
        assert start is not None
        out[(f"gpa@{start * PAGE:#x}", pfn - start)] = pages[pfn]
        prev = pfn
    return out


# ----------------------------------------------------------- malformed ----
def _elf(**kw: object) -> bytes:
    spec, _ = valid_elf_spec()
    for k, v in kw.items():
        setattr(spec, k, v)
    return build_elf(spec)


def _kd(**kw: object) -> bytes:
    spec = KdumpSpec(valid_kdump_pages(), 200)
    for k, v in kw.items():
        setattr(spec, k, v)
    return build_kdump(spec)


def _overlap_in_file() -> bytes:
    """PT_LOAD 2's file range starts inside PT_LOAD 1's."""
    blob = bytearray(build_elf(ElfSpec([Seg(0, page(1) * 2), Seg(0x10000, page(2) * 2)])))
    off1 = PHDR.unpack_from(blob, EHDR.size + PHDR.size)[2]
    struct.pack_into("<Q", blob, EHDR.size + 2 * PHDR.size + 8, off1 + PAGE)
    return bytes(blob)


def malformed_corpus() -> list[tuple[str, bytes, tuple[str, ...]]]:
    """(case name, file bytes, words the DumpError message must contain)."""
    valid_elf = _elf()
    big = 1 << 64
    cases: list[tuple[str, bytes, tuple[str, ...]]] = [
        ("elf-wrong-magic", b"\x7fELG" + valid_elf[4:], ("magic",)),
        ("elf-not-core", _elf(e_type=2), ("ET_CORE",)),
        ("elf-class32", _elf(ident_class=1), ("ELFCLASS32",)),
        ("elf-big-endian", _elf(ident_data=2), ("little endian",)),
        ("elf-bad-phentsize", _elf(phentsize=32), ("e_phentsize",)),
        ("elf-phdrs-past-eof", _elf(phoff=len(valid_elf) - 10),
         ("program header table", "inside the file")),
        ("elf-offset-overflow", _elf(segs=[Seg(0, b"", offset=big - PAGE, filesz=2 * PAGE,
                                               memsz=2 * PAGE)]), ("overflows",)),
        ("elf-segment-past-eof", _elf(segs=[Seg(0, page(1), filesz=64 * PAGE, memsz=64 * PAGE)]),
         ("past the end",)),
        ("elf-filesz-gt-memsz", _elf(segs=[Seg(0, page(1) * 2, memsz=PAGE)]),
         ("p_filesz", "p_memsz")),
        ("elf-overlap-file", _overlap_in_file(), ("overlap", "file")),
        ("elf-overlap-gpa", _elf(segs=[Seg(0, page(1) * 2), Seg(PAGE, page(2))]),
         ("overlap", "guest-physical")),
        ("elf-truncated", valid_elf[: len(valid_elf) - PAGE - 100], ("past the end",)),
        ("elf-truncated-header", valid_elf[:40], ("truncated",)),
        ("elf-xnum-no-section", _elf(xnum=True, xnum_section=False), ("PN_XNUM",)),
        ("kdump-bad-signature", _kd(signature=b"KDUMQ   "), ("bad signature",)),
        ("kdump-not-a-dump", b"\x00" * 8192, ("bad signature",)),
        ("kdump-desc-outside-file", _kd(desc_override={100: {"offset": 1 << 40}}),
         ("pfn 0x64", "outside")),
        ("kdump-size-gt-block", _kd(desc_override={1: {"size": PAGE + 1}}),
         ("pfn 0x1", "> block_size")),
        ("kdump-wrong-decompressed-size", _kd(data_override={102: zlib.compress(bytes(2048))}),
         ("pfn 0x66", "decompresses to 2048")),
        ("kdump-unknown-flag", _kd(desc_override={6: {"flags": 0x40}}),
         ("pfn 0x6", "unknown compression flags 0x40")),
        ("kdump-corrupt-zlib", _kd(data_override={0: b"\x78\x01garbage-not-deflate"}),
         ("pfn 0x0", "corrupt")),
        ("kdump-raw-size-mismatch", _kd(desc_override={6: {"size": 100}}),
         ("pfn 0x6", "uncompressed", "!= block_size")),
        ("kdump-bitmap-past-eof", _kd(bitmap_blocks=2000), ("bitmap", "past the end")),
        ("kdump-bitmap-past-eof-plain", _kd(flattened=False, truncate_logical=3 * PAGE),
         ("bitmap", "past the end")),
        ("kdump-desc-table-past-eof", _kd(truncate_logical=4 * PAGE + 24),
         ("page descriptor table", "past the end")),
        ("kdump-flat-no-end-marker", _kd(drop_end_marker=True), ("no end marker",)),
        ("kdump-flat-truncated-record", _kd()[:-2000], ("truncated",)),
        ("kdump-flat-overlap", _kd(overlap_record=True), ("overlap",)),
        ("kdump-header-version", _kd(header_version=0x06000000), ("header_version",)),
        ("kdump-block-size", _kd(block_size=8192), ("block_size 8192",)),
        ("kdump-incomplete", _kd(status=1 | 8), ("incomplete",)),
        ("kdump-truncated-plain", _kd(flattened=False)[:PAGE + 100], ("outside the file",)),
    ]
    return cases


def write_corpus(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, blob, _ in malformed_corpus():
        p = directory / name
        p.write_bytes(blob)
        out[name] = p
    return out


@contextlib.contextmanager
def mapping_process(script: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run ``script`` (with ``args``) in a child Python that maps memory and prints
    its address (hex) on the first line; yields (process, address), killed
    afterwards. The live-source tests read that process's memory."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline(), 16)
    finally:
        proc.kill()
        proc.wait()
