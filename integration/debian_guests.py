"""Real Debian 12 guests for the integration tier: boot, name, clean up, and an
attribution of KSM pages computed here, independently of vmshare's code.

Guests get unique names (a random suffix per boot) and their own directory
for overlays and console logs; every one is destroyed by name at the end.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vmshare.guest.debian import (
    DebianImage,
    GuestFill,
    build_debian_image,
    debian_domain_xml,
    make_overlay,
    wait_debian_ready,
)
from vmshare.hypervisor.metadata import adopted_element

LIBVIRT_URI = "qemu:///system"
PREFIX = "vmshare-it-deb-"
PAGE = 4096
KPF_KSM = 1 << 21
PM_PRESENT = 1 << 63
PFN_MASK = (1 << 55) - 1
USER_TOP = 1 << 47


@dataclass
class DebianGuests:
    names: list[str]
    directory: Path
    image: DebianImage
    boot_seconds: float

    def pid(self, name: str) -> int:
        return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def virsh(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@contextlib.contextmanager
def booted_debian_guests(count: int, *, memory_mib: int = 512, video: bool = False,
                         timeout: float = 240.0, fills: Sequence[GuestFill | None] = (),
                         ) -> Iterator[DebianGuests]:
    """``count`` Debian guests booted together (transient libvirt domains on
    qcow2 overlays of one root disk), ready on their serial consoles; guest i
    writes ``fills[i]``'s pages first (none beyond the list or for None)."""
    assert len(fills) <= count, (fills, count)
    fill_of = [*fills, *[None] * (count - len(fills))]
    image = build_debian_image()
    tag = secrets.token_hex(3)
    names: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vmshare-deb-") as tmp:
        directory = Path(tmp)
        os.chmod(directory, 0o700)
        start = time.monotonic()
        try:
            for i in range(count):
                name = f"{PREFIX}{tag}-{i + 1}"
                overlay = make_overlay(image, directory / f"{name}.qcow2")
                # written adopted (vmshare's <nosharepages/>): nothing mergeable until
                # vmshare turns the RAM backend on, VRAM and ROMs never
                xml = debian_domain_xml(name, image, overlay, memory_mib=memory_mib,
                                        console_log=directory / f"{name}.log", video=video,
                                        nosharepages=True, metadata_xml=adopted_element(),
                                        fill=fill_of[i])
                result = virsh_create(xml, directory / f"{name}.xml")
                assert result.returncode == 0, f"virsh create {name}: {result.stderr}"
                names.append(name)
            guests = DebianGuests(names, directory, image, 0.0)
            for name, fill in zip(names, fill_of, strict=True):
                log = directory / f"{name}.log"
                wait_debian_ready(log, timeout=timeout, pid=guests.pid(name))
                if fill is not None:      # the ready unit runs after the fill's
                    assert fill.marker in log.read_text(errors="replace"), \
                        f"{name}: no {fill.marker!r} on its console before ready"
            guests.boot_seconds = time.monotonic() - start
            yield guests
        finally:
            for name in names:
                virsh("destroy", name, timeout=60)


def virsh_create(xml: str, path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(xml)
    return virsh("create", str(path))


def mergeable_ranges(pid: int) -> list[tuple[int, int]]:
    """Every VMA of ``pid`` whose VmFlags carry ``mg`` (MADV_MERGEABLE)."""
    ranges: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = head.split("-")
            current = (int(lo, 16), int(hi, 16))
        elif head == "VmFlags:" and current is not None and " mg" in f" {line[8:]}":
            ranges.append(current)
    return ranges


def present_pfns(pid: int, ranges: Sequence[tuple[int, int]]) -> np.ndarray[Any, Any]:
    """The PFNs of the present pages in ``ranges`` (one entry per mapping)."""
    chunks = []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        for lo, hi in ranges:
            raw = os.pread(fd, (hi - lo) // PAGE * 8, lo // PAGE * 8)
            entries = np.frombuffer(raw, dtype=np.uint64)
            present = entries[(entries & np.uint64(PM_PRESENT)) != 0]
            chunks.append(present & np.uint64(PFN_MASK))
    finally:
        os.close(fd)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)


def read_kpage(path: str, pfns: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """kpageflags/kpagecount values at ``pfns`` (read in one pass up to the highest)."""
    if not len(pfns):
        return np.zeros(0, dtype=np.uint64)
    top = int(pfns.max()) + 1
    buf = bytearray(top * 8)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        done = 0
        while done < len(buf):
            n = fh.readinto(view[done:done + (8 << 20)])
            if not n:
                break
            done += n
    table = np.frombuffer(buf, dtype=np.uint64)
    picked: np.ndarray[Any, Any] = table[pfns.astype(np.int64)]
    return picked


def independent_saved_pages(pids: dict[str, int]) -> dict[str, float]:
    """Each VM's fair share of the KSM pages it maps, from pagemap, kpageflags and
    kpagecount alone: a KSM page mapped k times gives (k-1)/k to each mapping."""
    pfns = {name: present_pfns(pid, mergeable_ranges(pid)) for name, pid in pids.items()}
    every = np.concatenate(list(pfns.values()))
    flags = read_kpage("/proc/kpageflags", every)
    counts = read_kpage("/proc/kpagecount", every)
    out: dict[str, float] = {}
    at = 0
    for name, mine in pfns.items():
        f = flags[at:at + len(mine)]
        k = counts[at:at + len(mine)].astype(np.float64)
        ksm = (f & np.uint64(KPF_KSM)) != 0
        out[name] = float(np.sum((k[ksm] - 1) / k[ksm]))
        at += len(mine)
    return out


def ksm_pfns(pid: int) -> set[int]:
    """The physical KSM pages mapped anywhere in ``pid`` (every mapping, not only
    mergeable ones: what counts for cross-VM sharing is the frame)."""
    ranges: list[tuple[int, int]] = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if hi <= USER_TOP:     # [vsyscall] sits above user space
            ranges.append((lo, hi))
    pfns = present_pfns(pid, ranges)
    flags = read_kpage("/proc/kpageflags", pfns)
    return {int(p) for p in pfns[(flags & np.uint64(KPF_KSM)) != 0]}
