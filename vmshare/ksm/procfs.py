"""Per-process and per-page KSM facts from /proc.

The only module that opens /proc (tests/test_layers.py checks it): its
/proc/<pid>/{smaps,ksm_stat,pagemap,stat,cmdline,cwd,clear_refs},
/proc/kpageflags, /proc/kpagecount, /proc/meminfo, /proc/uptime and the mount
table. Other packages ask ``ProcFs``; a reader that must stay bound to one
process (sources/live.py) holds descriptors ``ProcFs.open_fd`` gave it. The
root is injectable so tests run against temporary trees shaped like /proc.
"""
# size: over 400 lines on purpose: the one adapter for all of /proc (the
# architecture's rule), its readers sharing one error mapping and one root.

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vmshare.errors import AccessDenied, ProcessGone, ProcfsError
from vmshare.model import PAGE_SIZE, KsmStat, Vma

U64 = npt.NDArray[np.uint64]

# /proc/<pid>/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = np.uint64((1 << 55) - 1)
PM_EXCLUSIVE_BIT = 56
PM_FILE_BIT = 61
PM_SWAP_BIT = 62
PM_PRESENT_BIT = 63
# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_THP = 22
KPF_KSM = 21
KPF_ZERO_PAGE = 24
# A PMD-mapped transparent huge page (x86_64 and aarch64 with 4 KiB pages)
HPAGE_PMD_SIZE = 2 * 2**20

PROC_ROOT = "/proc"
MOUNTS_PATH = "/proc/mounts"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_CMDLINE_BYTES = 1024 * 1024
# Sparse PFN look-ups: PFNs at most this far apart are read in one pread.
_PFN_GAP = 8


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat that vmshare uses."""

    comm: str
    cpu_seconds: float    # utime + stime
    start_time: int       # clock ticks after boot
    state: str = "R"      # field 3: R, S, D, ..., Z (zombie), X (dead)


def _map_oserror(exc: OSError, what: str, pid: int | None = None) -> Exception:
    if exc.errno in (errno.ENOENT, errno.ESRCH) and pid is not None:
        return ProcessGone(f"process {pid} is gone ({what})")
    if exc.errno in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"cannot read {what}: permission denied (needs root; "
                            "ptrace/yama or sVirt rules may also forbid it)")
    return ProcfsError(f"cannot read {what}: {exc.strerror or exc}")


class ProcFs:
    """Reads /proc (or a test tree shaped like it).

    Errors: ProcessGone (ENOENT/ESRCH: the process exited), AccessDenied
    (EPERM/EACCES), ProcfsError (anything unparseable).
    """

    def __init__(self, root: Path | str = PROC_ROOT) -> None:
        self.root = Path(root)

    def _pid_text(self, pid: int, name: str) -> str:
        path = self.root / str(pid) / name
        try:
            return path.read_text(errors="replace")
        except OSError as exc:
            raise _map_oserror(exc, str(path), pid) from exc

    # ---- process identity ---------------------------------------------
    def exists(self, pid: int) -> bool:
        return (self.root / str(pid)).is_dir()

    def stat(self, pid: int) -> ProcStat:
        """comm, CPU time and start time from one read of /proc/<pid>/stat."""
        text = self._pid_text(pid, "stat")
        try:
            # comm (field 2) may contain spaces and parentheses: split after the last ')'.
            close = text.rindex(")")
            rest = text[close + 2:].split()
            return ProcStat(comm=text[text.index("(") + 1:close],
                            cpu_seconds=(int(rest[11]) + int(rest[12])) / _CLK_TCK,
                            start_time=int(rest[19]), state=rest[0])
        except (ValueError, IndexError) as exc:
            raise ProcfsError(f"/proc/{pid}/stat: unexpected format") from exc

    def start_time(self, pid: int) -> int:
        """Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid,
        it names one process for good, so a reused pid is detected."""
        return self.stat(pid).start_time

    def cpu_seconds(self, pid: int) -> float:
        """utime + stime of /proc/<pid>/stat (fields 14 and 15), in seconds."""
        return self.stat(pid).cpu_seconds

    def alive(self, pid: int, start_time: int | None = None) -> bool:
        """Does ``pid`` run and hold memory (not a zombie)? With ``start_time``,
        only if it is still the process that started then (not a reused pid).
        Raises AccessDenied only; a vanished or unreadable process is not alive."""
        try:
            st = self.stat(pid)
        except (ProcessGone, ProcfsError):
            return False
        same = start_time is None or st.start_time == start_time
        return same and st.state not in ("Z", "X")

    def comm(self, pid: int) -> str:
        return self._pid_text(pid, "comm").strip()

    def pids_named(self, comm: str) -> list[int]:
        """Processes and kernel threads whose comm is ``comm`` (ksmd, ...)."""
        found = []
        for entry in self.root.iterdir():
            if entry.name.isdigit():
                try:
                    if (entry / "comm").read_text().strip() == comm:
                        found.append(int(entry.name))
                except OSError:
                    continue           # exited while we looked
        return sorted(found)

    def cmdline(self, pid: int) -> list[str]:
        """argv of ``pid`` (at most 1 MiB read; empty arguments kept in place).

        Raises ProcessGone also for an empty cmdline (zombie, kernel thread).
        """
        path = self.root / str(pid) / "cmdline"
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CMDLINE_BYTES)
        except OSError as exc:
            raise _map_oserror(exc, str(path), pid) from exc
        if not raw:
            raise ProcessGone(f"process {pid} has exited (empty cmdline)")
        return [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]

    def cwd(self, pid: int) -> str | None:
        """Where /proc/<pid>/cwd points, or None when it cannot be read."""
        try:
            return os.readlink(self.root / str(pid) / "cwd")
        except OSError:
            return None

    def open_fd(self, pid: int, name: str) -> int:
        """A read-only descriptor of /proc/<pid>/<name> (mem, pagemap, ...).

        A descriptor stays bound to the process that had the pid when it was
        opened: a reader that holds it cannot be redirected by a reused pid.
        The caller closes it. Raises ProcessGone, AccessDenied, ProcfsError.
        """
        path = self.root / str(pid) / name
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _map_oserror(exc, str(path), pid) from exc

    def clear_soft_dirty(self, pid: int) -> bool:
        """Clear the soft-dirty bits of ``pid``'s pages (write "4" to clear_refs).

        False when the kernel refuses (EINVAL: no CONFIG_MEM_SOFT_DIRTY).
        Raises ProcessGone, AccessDenied, ProcfsError.
        """
        path = self.root / str(pid) / "clear_refs"
        try:
            with open(path, "w") as f:
                f.write("4")
            return True
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise _map_oserror(exc, str(path), pid) from exc

    # ---- mappings -------------------------------------------------------
    def smaps(self, pid: int) -> list[Vma]:
        """Every mapping of ``pid`` with its VmFlags, Rss and AnonHugePages."""
        return parse_smaps(self._pid_text(pid, "smaps"), f"/proc/{pid}/smaps")

    def ksm_stat(self, pid: int) -> KsmStat:
        """/proc/<pid>/ksm_stat; a kernel without it gives ProcfsError."""
        text = self._pid_text(pid, "ksm_stat")
        fields: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            value = value.strip()
            if value in ("yes", "no"):
                fields[key] = int(value == "yes")
            elif value.lstrip("-").isdigit():
                fields[key] = int(value)
        return KsmStat(
            ksm_rmap_items=fields.get("ksm_rmap_items", 0),
            ksm_zero_pages=fields.get("ksm_zero_pages", 0),
            ksm_merging_pages=fields.get("ksm_merging_pages", 0),
            ksm_process_profit=fields.get("ksm_process_profit", 0),
            ksm_merge_any=bool(fields.get("ksm_merge_any", 0)),
            ksm_mergeable=bool(fields.get("ksm_mergeable", 0)),
        )

    # ---- page frames ----------------------------------------------------
    def pagemap(self, pid: int, start: int, npages: int) -> U64:
        """Pagemap entries for ``npages`` pages from virtual address ``start``."""
        path = self.root / str(pid) / "pagemap"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise _map_oserror(exc, str(path), pid) from exc
        try:
            out = np.empty(npages, dtype=np.uint64)
            view = memoryview(out.data).cast("B")
            offset = (start // PAGE_SIZE) * 8
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise ProcessGone(f"process {pid} is gone (short read of {path})")
                done += n
            return out
        except OSError as exc:
            raise _map_oserror(exc, str(path), pid) from exc
        finally:
            os.close(fd)

    def kpageflags(self, pfns: U64) -> U64:
        """/proc/kpageflags entries for ``pfns`` (any order, repeats allowed)."""
        return self._per_pfn("kpageflags", pfns)

    def kpagecount(self, pfns: U64) -> U64:
        """/proc/kpagecount entries (the page's map count) for ``pfns``."""
        return self._per_pfn("kpagecount", pfns)

    def _per_pfn(self, name: str, pfns: U64) -> U64:
        if len(pfns) == 0:
            return np.zeros(0, dtype=np.uint64)
        if len(pfns) == 1 or bool(np.all(pfns[1:] > pfns[:-1])):
            return self.read_sorted(name, pfns)
        uniq, inverse = np.unique(pfns, return_inverse=True)
        return self.read_sorted(name, uniq)[inverse.reshape(-1)]

    def read_sorted(self, name: str, uniq: U64) -> U64:
        """Entries of /proc/<name> (kpageflags or kpagecount) for strictly
        increasing PFNs. PFNs at most a small gap apart are read in one pread
        (the kernel's ~50 ns per entry against ~0.5 µs per call), the reads'
        bytes joined and picked out in one vectorised step: the 26,311
        all-zero pages of the 1 GiB mix looked up run by run took 26–34 ms,
        against 55–58 ms with a 64-entry gap and a numpy array per span."""
        path = self.root / name
        if len(uniq) == 0:
            return np.zeros(0, dtype=np.uint64)
        cut = np.flatnonzero(np.diff(uniq) > np.uint64(_PFN_GAP)) + 1
        span = np.repeat(np.arange(cut.size + 1), np.diff(cut, prepend=0, append=len(uniq)))
        firsts = uniq[np.concatenate(([0], cut))].astype(np.int64)
        lengths = uniq[np.append(cut - 1, len(uniq) - 1)].astype(np.int64) - firsts + 1
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise _map_oserror(exc, str(path)) from exc
        try:
            raw = b"".join([os.pread(fd, n * 8, first * 8) for first, n in
                            zip(firsts.tolist(), lengths.tolist(), strict=True)])
        except OSError as exc:
            raise _map_oserror(exc, str(path)) from exc
        finally:
            os.close(fd)
        if len(raw) != int(lengths.sum()) * 8:
            raise ProcfsError(f"{path}: PFN {int(uniq[-1])} is past the end")
        at = np.cumsum(lengths) - lengths                 # each span's place in raw
        index = at[span] + (uniq.astype(np.int64) - firsts[span])
        values: U64 = np.frombuffer(raw, dtype=np.uint64)[index]
        return values

    def zero_pfn(self) -> int | None:
        """The PFN of the kernel's shared zero page, or None where it cannot be
        learned (not root, or an architecture with several zero pages).

        Found by read-faulting one fresh private anonymous page of our own,
        which the kernel maps to the zero page, and reading our own pagemap.
        """
        if os.uname().machine not in ("x86_64", "aarch64"):
            return None
        area = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            area[0]                                   # read fault: maps the zero page
            addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
            try:
                entry = int(self.pagemap(os.getpid(), addr, 1)[0])
            except (AccessDenied, ProcessGone, ProcfsError):
                return None
            pfn = entry & int(PM_PFN_MASK)
            present = entry >> PM_PRESENT_BIT & 1
            return pfn if present and pfn else None
        finally:
            area.close()

    def huge_zero_pfn(self) -> int | None:
        """The first PFN of the kernel's huge zero page (512 PFNs, 2 MiB aligned),
        or None where it cannot be learned: transparent huge pages off (or
        ``use_zero_page`` 0), not root, or not x86_64/aarch64 with 4 KiB pages.

        Found by read-faulting a 2 MiB-aligned MADV_HUGEPAGE area of our own and
        reading our pagemap; kpageflags must confirm it (KPF_ZERO_PAGE and
        KPF_THP). There is one huge zero page at a time, freed only once no
        process holds it, and this process now holds it until it exits: the
        PFN stays right for as long as anyone can compare against it.
        """
        if os.uname().machine not in ("x86_64", "aarch64") or mmap.PAGESIZE != PAGE_SIZE:
            return None
        area = mmap.mmap(-1, 2 * HPAGE_PMD_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            base = ctypes.addressof(ctypes.c_char.from_buffer(area))
            off = -base % HPAGE_PMD_SIZE
            area.madvise(mmap.MADV_HUGEPAGE, off, HPAGE_PMD_SIZE)
            area[off]                                 # read fault: the huge zero page
            entries = self.pagemap(os.getpid(), base + off, 2)
            pfn = int(entries[0] & PM_PFN_MASK)
            if not (all(int(e) >> PM_PRESENT_BIT & 1 for e in entries) and pfn
                    and pfn % (HPAGE_PMD_SIZE // PAGE_SIZE) == 0
                    and int(entries[1] & PM_PFN_MASK) == pfn + 1):
                return None
            flags = int(self.kpageflags(np.array([pfn], dtype=np.uint64))[0])
            huge_zero = flags >> KPF_ZERO_PAGE & 1 and flags >> KPF_THP & 1
            return pfn if huge_zero else None
        except (AccessDenied, ProcessGone, ProcfsError, OSError):
            return None
        finally:
            area.close()

    def anon_page_flags(self) -> int | None:
        """The /proc/kpageflags word of a page that is certainly not a KSM page:
        a private anonymous page of this process, written (so present and
        exclusively ours), never MADV_MERGEABLE. Attribution compares it with
        KPF_KSM to catch kernels that flag every anonymous page as KSM.

        Returns None where it cannot be learned (PFNs hidden without root, the
        page not reported present and exclusive).
        """
        area = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            area[0:1] = b"\x01"                       # write fault: a page of our own
            addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
            try:
                entry = int(self.pagemap(os.getpid(), addr, 1)[0])
                pfn = entry & int(PM_PFN_MASK)
                if not (entry >> PM_PRESENT_BIT & 1 and entry >> PM_EXCLUSIVE_BIT & 1 and pfn):
                    return None
                return int(self.kpageflags(np.array([pfn], dtype=np.uint64))[0])
            except (AccessDenied, ProcessGone, ProcfsError):
                return None
        finally:
            area.close()

    # ---- host -----------------------------------------------------------
    def boot_time(self) -> float:
        """Epoch seconds at which the host booted, from /proc/uptime
        (centisecond precision). Raises ProcfsError."""
        path = self.root / "uptime"
        try:
            return time.time() - float(path.read_text().split()[0])
        except OSError as exc:
            raise _map_oserror(exc, str(path)) from exc
        except (ValueError, IndexError) as exc:
            raise ProcfsError(f"{path}: unexpected format") from exc

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo in bytes."""
        path = self.root / "meminfo"
        try:
            text = path.read_text()
        except OSError as exc:
            raise _map_oserror(exc, str(path)) from exc
        info: dict[str, int] = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                info[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        return info


def mount_table(path: str = MOUNTS_PATH) -> str:
    """The text of the mount table (/proc/mounts, or a test file). Raises ProcfsError."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError as exc:
        raise ProcfsError(f"cannot read mount table {path}: {exc.strerror}") from exc


def parse_smaps(text: str, what: str = "smaps") -> list[Vma]:
    """Parse /proc/<pid>/smaps text into Vma objects. Raises ProcfsError."""
    vmas: list[Vma] = []
    header: list[str] | None = None
    flags: frozenset[str] = frozenset()
    rss = anon_huge = 0
    thp_eligible: bool | None = None

    def flush() -> None:
        if header is None:
            return
        try:
            lo, hi = header[0].split("-")
            vmas.append(Vma(start=int(lo, 16), end=int(hi, 16), perms=header[1],
                            offset=int(header[2], 16),
                            pathname=header[5] if len(header) > 5 else "",
                            vmflags=flags, rss_bytes=rss, anon_huge_bytes=anon_huge,
                            thp_eligible=thp_eligible))
        except (ValueError, IndexError) as exc:
            raise ProcfsError(f"{what}: bad mapping line {' '.join(header)!r}") from exc

    for line in text.splitlines():
        if not line:
            continue
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):
            flush()
            header = line.split(None, 5)
            flags, rss, anon_huge, thp_eligible = frozenset(), 0, 0, None
        elif first == "VmFlags:":
            flags = frozenset(line.split()[1:])
        elif first == "Rss:":
            rss = int(line.split()[1]) * 1024
        elif first == "AnonHugePages:":
            anon_huge = int(line.split()[1]) * 1024
        elif first == "THPeligible:":
            thp_eligible = line.split()[1:2] != ["0"]
    flush()
    return vmas


# Keep this much memory free after vmshare takes some (an unmerge's copies, a
# scan's page copies): the larger of 256 MiB and 5% of RAM.
MEMORY_MARGIN_BYTES = 256 * 2**20
MEMORY_MARGIN_FRACTION = 0.05


@dataclass(frozen=True)
class Headroom:
    """Memory an action would take, against MemAvailable less the margin."""

    need_bytes: int
    available_bytes: int
    margin_bytes: int

    @property
    def ok(self) -> bool:
        return self.need_bytes + self.margin_bytes <= self.available_bytes


def headroom(procfs: ProcFs, need_bytes: int) -> Headroom:
    """``need_bytes`` against MemAvailable, keeping the margin free. Raises ProcfsError."""
    info = procfs.meminfo()
    margin = max(MEMORY_MARGIN_BYTES, int(info.get("MemTotal", 0) * MEMORY_MARGIN_FRACTION))
    return Headroom(need_bytes, info.get("MemAvailable", 0), margin)
