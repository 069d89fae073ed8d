"""Dumps of a real guest predict what the live scan of the same paused guest predicts.

ELF (``virsh dump --memory-only --format elf``) and kdump-zlib dumps are
taken through libvirt while the guest is paused (dumps/secure.py: 0600 files
in a root-only directory, removed afterwards, the guest resumed on every
path), and the live prediction is made while it is still paused. A dump also
holds guest-physical ROM blocks (the BIOS at 0xfffc0000) that are no RAM
backend, so the dump side is compared over the RAM backend's range (region
gpa@0x0, the backend's size): there every counter must be equal.

Raw QMP dump-guest-memory through libvirt's monitor passthrough is avoided:
libvirt 9.0 crashes on the DUMP_COMPLETED event of a dump it did not start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import pytest

from integration.domains import domain_name
from tests.dump_corpus import malformed_corpus, write_corpus
from vmshare.engine import EngineConfig
from vmshare.guest import FillSpec
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import PageRun, Region
from vmshare.observe.host import Observer
from vmshare.prediction.predict import Prediction, Target, domain_target, predict
from vmshare.sources import PageSource, open_dump
from vmshare.sources.base import WHOLE, Part, ReadInto
from vmshare.sources.secure import dump_file, ensure_dump_dir, paused_guard

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
NAME = domain_name("eng-dump")
SPEC = FillSpec(identical_mib=16, unique_mib=16, zero_mib=8, seed=44)
MEMORY_MIB = 192


class RamRange:
    """A dump source limited to the regions of the given keys."""

    def __init__(self, inner: PageSource, keys: set[str]) -> None:
        self.inner = inner
        self.name = inner.name
        self.keys = keys

    def regions(self) -> list[Region]:
        return [r for r in self.inner.regions() if r.key in self.keys]

    @property
    def read_into(self) -> ReadInto | None:
        return self.inner.read_into

    @read_into.setter
    def read_into(self, value: ReadInto | None) -> None:
        self.inner.read_into = value

    def runs(self, chunk_pages: int = 4096, part: Part = WHOLE) -> Iterator[PageRun]:
        return (r for r in self.inner.runs(chunk_pages, part) if r.region in self.keys)

    def read_pages(self, region: str, pages: npt.NDArray[np.int64], into: memoryview) -> None:
        self.inner.read_pages(region, pages, into)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def ram_dump_target(path: Path, name: str) -> Target:
    ram = Region("gpa@0x0", MEMORY_MIB << 20)
    with open_dump(path, name) as src:
        assert any(r.key == ram.key and r.size == ram.size for r in src.regions()), \
            src.regions()
    return Target(name, "dump", lambda: RamRange(open_dump(path, name), {ram.key}))


@pytest.fixture
def guest(boot_guests: Callable[..., list[Any]]) -> Any:
    (dom,) = boot_guests([NAME], SPEC, memory_mib=MEMORY_MIB)
    return dom


def counters(p: Prediction) -> tuple[int, ...]:
    (g,) = p.groups
    assert g.converged
    return g.counters.merge_state()


@pytest.mark.parametrize("use_zero_pages", [False, True], ids=["zero-off", "zero-on"])
def test_dumps_predict_like_the_paused_live_guest(guest: Any, use_zero_pages: bool,
                                                  tmp_path: Path) -> None:
    import libvirt

    from vmshare.hypervisor import connect

    hv: Any = connect("qemu:///system")
    ref = hv.lookup(NAME)
    for b in hv.ram_backends(ref):      # keep it out of concurrent kernel KSM tests
        hv.set_merge(ref, b.id, False)
    config = EngineConfig(use_zero_pages=use_zero_pages)
    dump_dir = ensure_dump_dir(tmp_path / "dumps")
    try:
        with dump_file(dump_dir, "elf") as elf, dump_file(dump_dir, "kdump") as kd:
            with paused_guard(guest.suspend, guest.resume, was_running=True):
                assert guest.state()[0] == libvirt.VIR_DOMAIN_PAUSED
                guest.coreDumpWithFormat(str(elf.path), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
                                         libvirt.VIR_DUMP_MEMORY_ONLY)
                guest.coreDumpWithFormat(str(kd.path),
                                         libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_KDUMP_ZLIB,
                                         libvirt.VIR_DUMP_MEMORY_ONLY)
                observer = Observer(hv, KsmSysfs(), ProcFs())
                # A dump cannot tell which pages sat in THPs: compare content only.
                live = predict([domain_target(hv, observer, NAME, thp_split=False)], config)
                assert guest.state()[0] == libvirt.VIR_DOMAIN_PAUSED
            assert guest.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            for f in (elf, kd):
                assert os.stat(f.path).st_mode & 0o777 == 0o600
            assert os.stat(dump_dir).st_mode & 0o777 == 0o700
            from_elf = predict([ram_dump_target(elf.path, "guest")], config)
            from_kdump = predict([ram_dump_target(kd.path, "guest")], config)
        assert not elf.path.exists() and not kd.path.exists()
    finally:
        hv.close()
    (src,) = live.groups[0].sources
    assert src.pages == MEMORY_MIB * 256          # every page of the RAM backend read
    assert src.ksm_pages > 0
    assert counters(from_elf) == counters(live)
    assert counters(from_kdump) == counters(live)
    assert from_elf.groups[0].sources[0].zero_content_pages == src.zero_content_pages
    assert from_elf.groups[0].sources[0].saved == src.saved


# ------------------------------------------------------------------ malformed dumps
@pytest.mark.parametrize("case", [c[0] for c in malformed_corpus()][::3])
def test_malformed_dump_is_one_line(case: str, tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "corpus")
    words = {n: w for n, _, w in malformed_corpus()}[case]
    proc = subprocess.run([sys.executable, "-m", "vmshare", "predict", "--dump",
                           str(paths[case])], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmshare: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    # Neither ELF nor kdump by their first bytes: refused as such (not read as raw).
    unrecognised = case in ("elf-wrong-magic", "kdump-bad-signature", "kdump-not-a-dump")
    for w in ("neither an ELF core nor a kdump",) if unrecognised else words:
        assert w in lines[0]
