"""Attribution on synthetic pagemap/kpageflags/kpagecount files with known answers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ksmtree import EXCLUSIVE, KPF_KSM, KPF_ZERO, PRESENT, FakeProc
from vmshare.errors import AccessDenied, ProcessGone, ProcfsError
from vmshare.ksm.procfs import ProcFs, parse_smaps
from vmshare.model import RamBackend, Vma
from vmshare.observe.attribution import (
    attribute,
    check_kpf_ksm,
    match_ram_vmas,
    mergeable_mismatch,
)

BASE = 0x7F0000000000


def test_fair_share_and_matrix_known_answer(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    # PFN 100: KSM page mapped by a (twice) and b (once): k=3.
    # PFN 200: KSM page mapped by b and c: k=2.  PFN 300: a's own exclusive page.
    # PFN 400: KSM page mapped by a and a non-VM process: k=2.  PFN 1: zero page.
    fake.flags[[100, 200, 400]] = KPF_KSM
    fake.flags[1] = KPF_ZERO
    fake.counts[100], fake.counts[200], fake.counts[400] = 3, 2, 2
    fake.counts[300] = 1
    fake.flush()
    fake.add_process(10, BASE, [PRESENT | 100, PRESENT | 100, PRESENT | EXCLUSIVE | 300,
                                PRESENT | 400, PRESENT | 1, 0])
    fake.add_process(20, BASE, [PRESENT | 100, PRESENT | 200])
    fake.add_process(30, BASE, [PRESENT | 200, 0, 0])
    proc = ProcFs(tmp_path)
    vms = {"a": proc.pagemap(10, BASE, 6), "b": proc.pagemap(20, BASE, 2),
           "c": proc.pagemap(30, BASE, 3)}
    att = attribute(vms, proc.kpageflags, proc.kpagecount)
    assert att.per_vm["a"].resident_pages == 5
    assert att.per_vm["a"].ksm_pages == 3
    assert att.per_vm["a"].saved_pages == pytest.approx(2 / 3 + 2 / 3 + 1 / 2)
    assert att.per_vm["b"].saved_pages == pytest.approx(2 / 3 + 1 / 2)
    assert att.per_vm["c"].saved_pages == pytest.approx(1 / 2)
    # pages_sharing for these three pages is (3-1)+(2-1)+(2-1)=4; the non-VM
    # process holds the missing 1/2 of PFN 400.
    total = sum(f.saved_pages for f in att.per_vm.values())
    assert total == pytest.approx(4 - 0.5)
    assert att.shares_with == {"a": {"b": 2}, "b": {"a": 1, "c": 1}, "c": {"b": 1}}


def test_hidden_pfns_are_access_denied(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add_process(10, BASE, [PRESENT, PRESENT])
    proc = ProcFs(tmp_path)
    with pytest.raises(AccessDenied, match="root"):
        attribute({"a": proc.pagemap(10, BASE, 2)}, proc.kpageflags, proc.kpagecount)


def test_vanished_process_is_process_gone(tmp_path: Path) -> None:
    proc = ProcFs(tmp_path)
    with pytest.raises(ProcessGone, match="4242"):
        proc.pagemap(4242, BASE, 1)
    with pytest.raises(ProcessGone):
        proc.smaps(4242)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=30), min_size=1, max_size=4),
       st.integers(0, 6))
def test_per_vm_sums_equal_pages_sharing(layout: list[list[int]], outsiders: int) -> None:
    """Random mappings of 41 candidate KSM pages by VMs and non-VM mappers:
    the VMs' saved pages plus the outsiders' share equal sum(k-1)."""
    counts: dict[int, int] = {}
    for pages in layout:
        for pfn in pages:
            counts[pfn + 100] = counts.get(pfn + 100, 0) + 1
    extra = {pfn: outsiders for pfn in list(counts)[:3]}
    flags = np.zeros(200, dtype=np.uint64)
    kcount = np.zeros(200, dtype=np.uint64)
    for pfn, n in counts.items():
        k = n + extra.get(pfn, 0)
        kcount[pfn] = k
        flags[pfn] = KPF_KSM if k > 1 else 0
    vms = {f"vm{i}": np.array([PRESENT | (p + 100) | (EXCLUSIVE if counts[p + 100] +
                                extra.get(p + 100, 0) == 1 else 0) for p in pages],
                               dtype=np.uint64)
           for i, pages in enumerate(layout)}
    att = attribute(vms, lambda p: flags[p.astype(np.int64)], lambda p: kcount[p.astype(np.int64)])
    pages_sharing = sum(int(kcount[p]) - 1 for p in counts if kcount[p] > 1)
    outsider_share = sum(extra[p] * (kcount[p] - 1) / kcount[p] for p in extra if kcount[p] > 1)
    total = sum(f.saved_pages for f in att.per_vm.values())
    assert total + outsider_share == pytest.approx(pages_sharing)


SMAPS = """\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 512 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              200000 kB
AnonHugePages:      4096 kB
VmFlags: rd wr mr mw me ac dc hg mg
7f0020000000-7f0028000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                   0 kB
VmFlags: rd wr mr mw me ac dc hg
7f0030000000-7f0038000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                   0 kB
VmFlags: rd wr mr mw me ac dc hg mg
7f0040000000-7f0044000000 rw-s 00000000 00:01 99 /memfd:memory-backend-memfd (deleted)
Size:              65536 kB
VmFlags: rd wr sh mr mw me ms sd
7f0050000000-7f0060000000 rwxp 00000000 00:00 0
Size:             262144 kB
VmFlags: rd wr ex mr mw me ac
"""


def test_parse_smaps_and_match_backends() -> None:
    vmas = parse_smaps(SMAPS)
    assert len(vmas) == 6
    ram = vmas[1]
    assert ram.size == 256 * 2**20 and ram.mergeable and ram.anon_huge_bytes == 4096 * 1024
    assert ram.rss_bytes == 200000 * 1024
    backends = [
        RamBackend("pc.ram", 256 * 2**20, merge=True),
        RamBackend("node0", 128 * 2**20, merge=False),
        RamBackend("node1", 128 * 2**20, merge=True),
        RamBackend("mem0", 64 * 2**20, merge=True, qom_type="memory-backend-memfd", share=True),
    ]
    found = match_ram_vmas(vmas, backends)
    # The 256 MiB rwx TCG buffer is never taken for pc.ram.
    assert found["pc.ram"].start == 0x7F0000000000
    assert {found["node0"].start, found["node1"].start} == {0x7F0020000000, 0x7F0030000000}
    assert found["mem0"].pathname.startswith("/memfd:")
    assert mergeable_mismatch(backends, found) == []
    wrong = [RamBackend("pc.ram", 256 * 2**20, merge=False), *backends[1:]]
    assert mergeable_mismatch(wrong, found) == ["pc.ram"]
    both_off = [backends[0], RamBackend("node0", 128 * 2**20, merge=False),
                RamBackend("node1", 128 * 2**20, merge=False), backends[3]]
    # One of the two equal-size mappings has mg while neither should: exactly that one
    # is named, whichever backend the order guess matched it to.
    flagged = [b for b in ("node0", "node1") if found[b].mergeable]
    assert len(flagged) == 1
    assert mergeable_mismatch(both_off, found) == flagged


def test_no_mapping_of_that_size_is_left_out() -> None:
    vmas = [Vma(0x1000, 0x2000, "rw-p", 0, "")]
    assert match_ram_vmas(vmas, [RamBackend("pc.ram", 2**30, merge=True)]) == {}


def test_sparse_and_long_pfn_spans_read_exactly(tmp_path: Path) -> None:
    """Look-ups spanning more than one read window, with gaps, repeats and
    unsorted input, return exactly each PFN's entry."""
    fake = FakeProc(tmp_path, npfns=400_000)
    fake.flags[:] = np.arange(400_000, dtype=np.uint64) * np.uint64(3)
    fake.flush()
    proc = ProcFs(tmp_path)
    rng = np.random.default_rng(5)
    pfns = np.concatenate([rng.integers(0, 400_000, 5000), np.arange(10, 200_000, 7),
                           [399_999, 0, 0, 131_072, 131_073]]).astype(np.uint64)
    assert np.array_equal(proc.kpageflags(pfns), pfns * np.uint64(3))
    with pytest.raises(Exception, match="past the end"):
        proc.kpageflags(np.array([400_000], dtype=np.uint64))


def test_zero_pfn_is_learned_as_root() -> None:
    import os
    proc = ProcFs()
    zero = proc.zero_pfn()
    if os.geteuid() != 0:
        assert zero is None
    else:
        assert zero
        assert int(proc.kpageflags(np.array([zero], dtype=np.uint64))[0]) & KPF_ZERO


def test_huge_zero_page_is_never_a_ksm_page(tmp_path: Path) -> None:
    """Read-faulted THP memory maps the huge zero page: present, not exclusive,
    pagemap's file bit (61) set, 512 distinct PFNs. Neither path counts it."""
    fake = FakeProc(tmp_path)
    file_bit = 1 << 61
    fake.flags[600:602] = KPF_ZERO | (1 << 22)
    fake.flags[100] = KPF_KSM
    fake.counts[100] = 2
    fake.flush()
    fake.add_process(10, BASE, [PRESENT | file_bit | 600, PRESENT | file_bit | 601,
                                PRESENT | 100])
    proc = ProcFs(tmp_path)
    for zero in (None, 1):
        att = attribute({"a": proc.pagemap(10, BASE, 3)}, proc.kpageflags, proc.kpagecount,
                        unforked_zero_pfn=zero)
        assert att.per_vm["a"].ksm_pages == 1
        assert att.per_vm["a"].saved_pages == pytest.approx(0.5)


# ------------------------------------------- kernels that misreport KPF_KSM ----
KPF_ANON = 1 << 12


def test_kpf_ksm_on_a_plain_anonymous_page_refuses_the_figures(tmp_path: Path) -> None:
    """Linux 6.10 flagged every anonymous page KSM: a page shared after fork
    (not exclusive, mapped twice) would be counted as half a page saved."""
    fake = FakeProc(tmp_path)
    fake.flags[:] = KPF_KSM | KPF_ANON           # what such a kernel reports
    fake.counts[500] = 2                         # shared with a forked child
    fake.flush()
    fake.add_process(10, BASE, [PRESENT | 500, PRESENT | EXCLUSIVE | 501])
    proc = ProcFs(tmp_path)
    entries = {"a": proc.pagemap(10, BASE, 2)}
    with pytest.raises(ProcfsError, match=r"KPF_KSM.*Linux 6\.10.*not reported"):
        attribute(entries, proc.kpageflags, proc.kpagecount,
                  anon_flags=lambda: KPF_KSM | KPF_ANON)
    # A kernel that flags the known page correctly is trusted, as is one
    # where the probe cannot be read (not root): the figures stand.
    for probe in (lambda: KPF_ANON, lambda: None):
        att = attribute(entries, proc.kpageflags, proc.kpagecount, anon_flags=probe)
        assert att.per_vm["a"].saved_pages == pytest.approx(0.5)

    def never() -> int | None:
        raise AssertionError("the unforked path reads no KPF_KSM and needs no probe")
    att = attribute(entries, proc.kpageflags, proc.kpagecount, unforked_zero_pfn=1,
                    anon_flags=never)
    assert att.per_vm["a"].ksm_pages == 1


def _max_pfn() -> int:
    """One past the highest PFN of any memory zone (/proc/zoneinfo)."""
    top = start = 0
    for line in Path("/proc/zoneinfo").read_text().splitlines():
        words = line.split()
        if words[:1] == ["spanned"]:
            spanned = int(words[1])
        elif words[:1] == ["start_pfn:"]:
            start = int(words[1])
            top = max(top, start + spanned)
    return top


@pytest.mark.skipif(os.geteuid() != 0, reason="PFNs in pagemap need root")
def test_probe_reads_a_fake_kpageflags_that_flags_everything_ksm(tmp_path: Path) -> None:
    """ProcFs pointed at a root whose kpageflags says KSM for every PFN: the
    probe of vmshare's own plain page sees it and attribution refuses."""
    (tmp_path / str(os.getpid())).symlink_to(f"/proc/{os.getpid()}")   # our real pagemap
    np.full(_max_pfn(), KPF_KSM | KPF_ANON, dtype=np.uint64).tofile(tmp_path / "kpageflags")
    np.full(1024, 2, dtype=np.uint64).tofile(tmp_path / "kpagecount")
    proc = ProcFs(tmp_path)
    flags = proc.anon_page_flags()
    assert flags == KPF_KSM | KPF_ANON
    with pytest.raises(ProcfsError, match="KPF_KSM"):
        check_kpf_ksm(flags)
    entries = np.array([PRESENT | 100, PRESENT | 101], dtype=np.uint64)
    with pytest.raises(ProcfsError, match="per-VM KSM figures would be wrong"):
        attribute({"a": entries}, proc.kpageflags, proc.kpagecount,
                  anon_flags=proc.anon_page_flags)


@pytest.mark.skipif(os.geteuid() != 0, reason="PFNs in pagemap need root")
def test_this_kernel_flags_a_plain_anonymous_page_correctly() -> None:
    flags = ProcFs().anon_page_flags()
    assert flags is not None and flags & KPF_ANON and not flags & KPF_KSM
    check_kpf_ksm(flags)


def test_probe_is_none_where_pfns_cannot_be_read(tmp_path: Path) -> None:
    assert ProcFs(tmp_path).anon_page_flags() is None     # no pagemap under this root
