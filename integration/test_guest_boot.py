"""Boot the test guest for real (TCG) and check, from the host, what its RAM holds.

Two plain-QEMU guests with the same seed must hold the same identical-region
pages (the expected sharing), their unique pages must differ, and every page
must be the one vmshare.guest.pattern predicts. A third boot goes through
libvirt (qemu:///system, transient domain).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import xxhash

from vmshare.guest import (
    FillSpec,
    GuestBootFailed,
    GuestImage,
    domain_xml,
    qemu_argv,
    wait_ready,
)
from vmshare.guest.pattern import (
    REGION_IDENTICAL,
    REGION_UNIQUE,
    REGION_VOLATILE,
    expected_pages,
    page_region,
)

pytestmark = pytest.mark.integration

PAGE = 4096
MIB_PAGES = 256
# The guest kernel's own text and data, busybox in the page cache and firmware
# tables are the same in two guests: about 3,700 pages (~14 MiB) of sharing on
# top of the identical region. The identical region is sized so that this
# baseline stays well inside the 10% tolerance.
MEMORY_MIB = 384
SPEC = FillSpec(identical_mib=224, unique_mib=32, zero_mib=16, volatile_mib=8, seed=7)
ZERO_PAGE = bytes(PAGE)
CHUNK = 16 << 20
BOOT_TIMEOUT = 120.0

Launcher = Callable[[list[str]], "subprocess.Popen[bytes]"]


@dataclass
class GuestRam:
    """One snapshot of a guest's RAM mapping read from the host."""

    pid: int
    start: int
    data: bytes
    present: list[bool]

    def page(self, index: int) -> bytes:
        return self.data[index * PAGE:(index + 1) * PAGE]

    @property
    def npages(self) -> int:
        return len(self.data) // PAGE


def guest_ram_mapping(pid: int, size: int) -> tuple[int, int]:
    """(start, end) of the QEMU process's private anonymous mapping of exactly ``size`` bytes."""
    found = []
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = header.match(line)
        if m is None:
            continue
        start, end, perms, path = int(m[1], 16), int(m[2], 16), m[3], m[4]
        if end - start == size and perms.startswith("rw") and perms[3] == "p" and not path:
            found.append((start, end))
    assert len(found) == 1, f"expected one {size >> 20} MiB anonymous mapping, found {found}"
    return found[0]


def read_guest_ram(pid: int, size: int) -> GuestRam:
    start, end = guest_ram_mapping(pid, size)
    npages = (end - start) // PAGE
    # pagemap first: reading /proc/<pid>/mem maps the zero page into holes.
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        entries = os.pread(f.fileno(), npages * 8, (start // PAGE) * 8)
    present = [bool(e >> 63) for e in struct.unpack(f"<{npages}Q", entries)]
    chunks = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for offset in range(start, end, CHUNK):
            chunks.append(os.pread(mem.fileno(), min(CHUNK, end - offset), offset))
    data = b"".join(chunks)
    assert len(data) == size
    return GuestRam(pid, start, data, present)


def page_hashes(ram: GuestRam) -> dict[bytes, int]:
    """Digest -> page index of every non-zero page."""
    digest = xxhash.xxh3_128_digest
    return {digest(p): i for i in range(ram.npages) if (p := ram.page(i)) != ZERO_PAGE}


def region_pages(ram: GuestRam, region: str) -> list[int]:
    return [i for i in range(ram.npages) if page_region(ram.data[i * PAGE:i * PAGE + 8]) == region]


def boot_plain(launch: Launcher, image: GuestImage, tmp: Path, name: str,
               spec: FillSpec = SPEC) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"{name}.console"
    argv = qemu_argv(image, spec, memory_mib=MEMORY_MIB, qmp_socket=tmp / f"{name}.qmp",
                     console_log=log, name=name)
    return launch(argv), log


def test_two_guests_share_exactly_the_identical_region(
        guest_image: GuestImage, qemu_launcher: Launcher, tmp_path: Path) -> None:
    started = time.monotonic()
    guests = [boot_plain(qemu_launcher, guest_image, tmp_path, f"g{i}") for i in range(2)]
    lines = [wait_ready(log, BOOT_TIMEOUT, pid=proc.pid) for proc, log in guests]
    boot_seconds = time.monotonic() - started
    assert lines == ["vmshare-fill: ready identical=224 unique=32 zero=16 volatile=8"] * 2

    ram_a, ram_b = (read_guest_ram(proc.pid, MEMORY_MIB << 20) for proc, _ in guests)
    hashes_a, hashes_b = page_hashes(ram_a), page_hashes(ram_b)

    # Every identical-region page is exactly the one the host-side pattern predicts.
    n_identical = SPEC.identical_mib * MIB_PAGES
    expected_hashes = {
        xxhash.xxh3_128_digest(page.tobytes())
        for first in range(0, n_identical, 8192)
        for page in expected_pages(REGION_IDENTICAL, SPEC.seed, first,
                                   min(8192, n_identical - first))}
    assert len(expected_hashes) == n_identical, "identical-region pages must all differ"
    assert len(expected_hashes & hashes_a.keys()) == n_identical
    assert len(expected_hashes & hashes_b.keys()) == n_identical

    # Cross-guest sharing: the identical region plus a little kernel noise, within 10%.
    shared = len(hashes_a.keys() & hashes_b.keys())
    assert n_identical <= shared <= n_identical * 1.1, (
        f"{shared} pages shared, expected {n_identical} +-10%")

    # Unique pages: the right number, all distinct, none found in the other guest.
    n_unique = SPEC.unique_mib * MIB_PAGES
    for ram, other in ((ram_a, hashes_b), (ram_b, hashes_a)):
        unique = {xxhash.xxh3_128_digest(ram.page(i)) for i in region_pages(ram, REGION_UNIQUE)}
        assert len(unique) == n_unique
        assert not unique & other.keys()

    # Zero region: at least that many resident pages that are all zero.
    for ram in (ram_a, ram_b):
        resident_zero = sum(1 for i in range(ram.npages)
                            if ram.present[i] and ram.page(i) == ZERO_PAGE)
        assert resident_zero >= SPEC.zero_mib * MIB_PAGES

    # Volatile pages: each one's counter (word 3) moves between two reads.
    volatile = region_pages(ram_a, REGION_VOLATILE)
    assert len(volatile) == SPEC.volatile_mib * MIB_PAGES
    time.sleep(0.7)
    with open(f"/proc/{ram_a.pid}/mem", "rb", buffering=0) as mem:
        for i in volatile[:: len(volatile) // 64]:
            before = struct.unpack_from("<Q", ram_a.data, i * PAGE + 24)[0]
            after = struct.unpack("<Q", os.pread(mem.fileno(), 8, ram_a.start + i * PAGE + 24))[0]
            assert after > before, f"volatile page {i} was not rewritten"
    print(f"two guests ready in {boot_seconds:.1f} s; shared {shared} pages "
          f"(identical region {n_identical})")


def test_fill_error_is_reported_at_once(
        guest_image: GuestImage, qemu_launcher: Launcher, tmp_path: Path) -> None:
    log = tmp_path / "bad.console"
    argv = qemu_argv(guest_image, FillSpec(identical_mib=1), qmp_socket=tmp_path / "bad.qmp",
                     console_log=log, name="vmshare-it-bad")
    argv[argv.index("-append") + 1] += " vmshare.seed=notanumber"
    proc = qemu_launcher(argv)
    with pytest.raises(GuestBootFailed, match="bad seed 'notanumber'"):
        wait_ready(log, BOOT_TIMEOUT, pid=proc.pid)


def test_libvirt_guest_boots_under_tcg(
        guest_image: GuestImage, transient_domains: Callable[[str], Any],
        tmp_path: Path) -> None:
    name = f"vmshare-it-guest-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "libvirt.console"
    xml = domain_xml(name, guest_image, FillSpec(identical_mib=16, unique_mib=8, seed=3),
                     console_log=log, hotplug_slots=1)
    dom = transient_domains(xml)
    assert wait_ready(log, BOOT_TIMEOUT) == (
        "vmshare-fill: ready identical=16 unique=8 zero=0 volatile=0")
    live = dom.XMLDesc(0)
    assert "type='qemu'" in live.split("\n", 1)[0]
    assert "<maxMemory slots='1'" in live
