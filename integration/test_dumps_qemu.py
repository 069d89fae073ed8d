"""Every page source agrees on a real QEMU guest's RAM.

A real TCG QEMU (64 MiB, paused with -S) gets known bytes written into its
guest RAM through /proc/<pid>/mem; then the live reader, dump-guest-memory
as ELF and as kdump-zlib, and pmemsave must yield the same page hashes for
the RAM they cover.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from vmshare.model import PAGE_SIZE, Vma
from vmshare.sources import (
    ElfCoreSource,
    KdumpSource,
    LiveProcessSource,
    PageSource,
    RawImageSource,
    private_anonymous_vmas,
)
from vmshare.sources.secure import dump_file

pytestmark = pytest.mark.integration

RAM = 64 << 20
# pc.ram offsets equal guest-physical addresses below the VGA window and
# from 1 MiB up; 0xa0000-0x100000 shows VGA/ROM there instead.
RAM_RANGES = [(0, 0xA0000), (0x100000, RAM)]
PATTERN_GPA = 2 << 20
PATTERN_PAGES = 512


def pattern(i: int) -> bytes:
    # 1 in 4 pages repeats page 0 of its group: duplicates, as KSM would see them.
    seed = i - i % 4 if i % 4 == 3 else i
    return struct.pack("<QQ", 0x564D5348415245, seed) * (PAGE_SIZE // 16)


def in_ram(gpa: int) -> bool:
    return any(lo <= gpa < hi for lo, hi in RAM_RANGES)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if os.geteuid() != 0:
        pytest.skip("reading another process's memory needs root")
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen([binary, "-accel", "tcg", "-machine", "pc", "-m", "64",
                             "-nodefaults", "-display", "none", "-S",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"QEMU did not start: {err.decode(errors='replace')[-500:]}")
        time.sleep(0.05)
    try:
        yield proc, sock
    finally:
        proc.kill()
        proc.wait()


def gpa_hashes(src: PageSource, base_of: dict[str, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for run in src.runs():
        base = base_of[run.region] + run.first_page * PAGE_SIZE
        for i in range(run.npages):
            out[base + i * PAGE_SIZE] = xxhash.xxh3_64_intdigest(
                run.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
    return out


def gpa_regions(src: PageSource) -> dict[str, int]:
    return {r.key: int(r.key.split("@")[1], 16) for r in src.regions()}


async def take_dumps(sock: Path, elf: Path, kdump: Path, raw: Path) -> list[dict[str, object]]:
    from qemu.qmp import QMPClient
    qmp = QMPClient("vmshare-test")
    await qmp.connect(str(sock))
    try:
        memdev = await qmp.execute("query-memdev")
        status = await qmp.execute("query-status")
        assert isinstance(status, dict) and status["running"] is False
        for path, fmt in ((elf, "elf"), (kdump, "kdump-zlib")):
            await asyncio.wait_for(qmp.execute("dump-guest-memory", {
                "paging": False, "protocol": f"file:{path}", "format": fmt}), 60)
            result = await qmp.execute("query-dump")
            assert isinstance(result, dict) and result["status"] == "completed", result
        await qmp.execute("pmemsave", {"val": 0, "size": RAM, "filename": str(raw)})
        status = await qmp.execute("query-status")
        assert isinstance(status, dict) and status["running"] is False
    finally:
        await qmp.disconnect()
    assert isinstance(memdev, list)
    return memdev


def test_live_elf_kdump_raw_agree(qemu: tuple[subprocess.Popen[bytes], Path],
                                  tmp_path: Path) -> None:
    proc, sock = qemu
    ram_vmas: list[Vma] = [v for v in private_anonymous_vmas(proc.pid) if v.size == RAM]
    assert len(ram_vmas) == 1, f"expected one 64 MiB anonymous RAM mapping, got {ram_vmas}"
    [ram] = ram_vmas

    # Known content into guest RAM, written through the QEMU process.
    fd = os.open(f"/proc/{proc.pid}/mem", os.O_RDWR)
    try:
        for i in range(PATTERN_PAGES):
            os.pwrite(fd, pattern(i), ram.start + PATTERN_GPA + i * PAGE_SIZE)
    finally:
        os.close(fd)

    with LiveProcessSource(proc.pid, [ram], name="qemu", backend_ids={ram.start: "pc.ram"}) \
            as live_src:
        live = gpa_hashes(live_src, {"pc.ram": 0})

    dump_dir = tmp_path / "dumps"
    with dump_file(dump_dir, "elf") as elf, dump_file(dump_dir, "kdump") as kd, \
            dump_file(dump_dir, "raw") as raw:
        memdev = asyncio.run(take_dumps(sock, elf.path, kd.path, raw.path))
        assert [m["id"] for m in memdev] == ["pc.ram"]
        for f in (elf, kd, raw):
            assert (os.stat(f.path).st_mode & 0o777) == 0o600
        with ElfCoreSource(elf.path) as s:
            elf_pages = gpa_hashes(s, gpa_regions(s))
            elf_keys = [r.key for r in s.regions()]
        with KdumpSource(kd.path) as s:
            assert s.flattened               # QEMU 7.2 writes the flattened layout
            kd_pages = gpa_hashes(s, gpa_regions(s))
            kd_keys = [r.key for r in s.regions()]
        with RawImageSource(raw.path) as s:
            raw_pages = gpa_hashes(s, {"gpa@0x0": 0})
    assert not any(p.exists() for p in (elf.path, kd.path, raw.path))

    zero = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))
    known = {PATTERN_GPA + i * PAGE_SIZE: xxhash.xxh3_64_intdigest(pattern(i))
             for i in range(PATTERN_PAGES)}

    # ELF and kdump cover the same guest-physical pages with the same content,
    # under the same region keys.
    assert elf_keys == kd_keys and "gpa@0x0" in elf_keys
    assert elf_pages == kd_pages
    assert all(gpa in elf_pages for gpa in range(0, RAM, PAGE_SIZE) if in_ram(gpa))
    # pmemsave agrees on RAM.
    assert len(raw_pages) == RAM // PAGE_SIZE
    mismatched = [gpa for gpa in raw_pages if in_ram(gpa) and raw_pages[gpa] != elf_pages[gpa]]
    assert mismatched == []
    # The live read has the written pages, agrees wherever it has a page, and
    # every page it skipped as not resident is zero in the dumps.
    assert all(live.get(gpa) == h for gpa, h in known.items())
    assert all(elf_pages[gpa] == h for gpa, h in known.items())
    assert all(elf_pages[gpa] == h for gpa, h in live.items() if in_ram(gpa))
    skipped = [gpa for gpa in range(0, RAM, PAGE_SIZE) if in_ram(gpa) and gpa not in live]
    assert skipped, "a paused fresh guest should have non-resident RAM"
    assert all(elf_pages[gpa] == zero for gpa in skipped)
