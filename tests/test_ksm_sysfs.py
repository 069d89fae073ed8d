from __future__ import annotations

from pathlib import Path

import pytest

from tests.ksmtree import make_sysfs
from vmshare.errors import KnobError, KsmUnavailable
from vmshare.ksm.sysfs import KNOBS, KsmSysfs
from vmshare.model import COUNTER_MEANINGS


@pytest.fixture
def sysfs(tmp_path: Path) -> KsmSysfs:
    return KsmSysfs(make_sysfs(tmp_path / "ksm"))


def test_reads_every_counter_and_knob(sysfs: KsmSysfs) -> None:
    counters = sysfs.counters()
    assert set(counters) == set(COUNTER_MEANINGS)
    assert counters["pages_sharing"] == 30
    knobs = sysfs.knobs()
    assert set(knobs) == set(KNOBS)
    assert knobs["advisor_mode"] == "none"
    assert knobs["max_page_sharing"] == 256


def test_missing_ksm_is_one_clear_error(tmp_path: Path) -> None:
    empty = KsmSysfs(tmp_path / "nothing")
    assert not empty.available()
    with pytest.raises(KsmUnavailable, match="CONFIG_KSM"):
        empty.counters()
    with pytest.raises(KsmUnavailable):
        empty.set("run", 1)


@pytest.mark.parametrize("name,value,words", [
    ("run", "3", "out of range"),
    ("run", "-1", "whole number"),
    ("max_page_sharing", "1", "out of range"),
    ("pages_to_scan", str(2**32), "out of range"),
    ("use_zero_pages", "maybe", "0 or 1"),
    ("advisor_mode", "fast", "scan-time"),
    ("advisor_max_cpu", str(2**32), "out of range"),
    ("advisor_target_scan_time", "0", "out of range"),
    ("advisor_min_pages_to_scan", "-1", "whole number"),
    ("no_such_knob", "1", "unknown KSM knob"),
    ("pages_sharing", "1", "read-only counter"),
])
def test_bad_values_rejected_before_any_write(sysfs: KsmSysfs, name: str, value: str,
                                              words: str) -> None:
    before = {p.name: p.read_text() for p in sysfs.root.iterdir()}
    with pytest.raises(KnobError, match=words):
        sysfs.set(name, value)
    assert {p.name: p.read_text() for p in sysfs.root.iterdir()} == before


def test_set_writes_and_reads_back(sysfs: KsmSysfs) -> None:
    assert sysfs.set("pages_to_scan", "5000") == 5000
    assert (sysfs.root / "pages_to_scan").read_text() == "5000\n"
    assert sysfs.set("use_zero_pages", "yes") == 1


def test_write_refused_by_kernel_is_knob_error(sysfs: KsmSysfs) -> None:
    (sysfs.root / "sleep_millisecs").unlink()
    (sysfs.root / "sleep_millisecs").mkdir()   # open(O_WRONLY) fails: EISDIR
    with pytest.raises(KnobError, match="sleep_millisecs"):
        sysfs.set("sleep_millisecs", 10)


def test_snapshot_restore_puts_back_every_knob(sysfs: KsmSysfs) -> None:
    snap = sysfs.snapshot()
    sysfs.set("pages_to_scan", 9)
    sysfs.set("run", 1)
    sysfs.set("advisor_max_cpu", 5)
    (sysfs.root / "pages_shared").write_text("0\n")
    sysfs.set("max_page_sharing", 10)
    sysfs.restore(snap)
    assert sysfs.knobs() == dict(snap.values)


def test_kernel_without_newer_knobs(sysfs: KsmSysfs) -> None:
    for name in ("smart_scan", "advisor_mode", "advisor_max_cpu", "general_profit"):
        (sysfs.root / name).unlink()
    assert "smart_scan" not in sysfs.knobs()
    assert "general_profit" not in sysfs.counters()
    with pytest.raises(KnobError, match="no such knob"):
        sysfs.set("smart_scan", 1)


def test_wait_full_scans_requires_running_ksmd(sysfs: KsmSysfs) -> None:
    with pytest.raises(KnobError, match="not running"):
        sysfs.wait_full_scans(1, timeout=0.1)
    sysfs.set("run", 1)
    with pytest.raises(KnobError, match="0 of 2 full scans"):
        sysfs.wait_full_scans(2, timeout=0.2)


def test_values_the_kernel_accepts_are_accepted(sysfs: KsmSysfs) -> None:
    # mm/ksm.c: advisor_max_cpu and the advisor page limits are plain kstrtoul,
    # so a snapshot holding 0 must restore.
    snap = sysfs.snapshot()
    (sysfs.root / "advisor_max_cpu").write_text("0\n")
    (sysfs.root / "advisor_min_pages_to_scan").write_text("0\n")
    zeroed = sysfs.snapshot()
    sysfs.restore(snap)
    sysfs.restore(zeroed)
    assert sysfs.knobs() == dict(zeroed.values)


def test_pages_to_scan_refused_before_writing_while_advisor_on(sysfs: KsmSysfs) -> None:
    (sysfs.root / "advisor_mode").write_text("none [scan-time]\n")
    before = (sysfs.root / "pages_to_scan").read_text()
    with pytest.raises(KnobError, match="advisor"):
        sysfs.set("pages_to_scan", 5000)
    assert (sysfs.root / "pages_to_scan").read_text() == before
