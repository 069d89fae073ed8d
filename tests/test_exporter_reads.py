"""One exporter snapshot reads each VM's facts, backends and mappings once,
however many parts of the snapshot (host view, policy survey) need them."""

from __future__ import annotations

import os
from pathlib import Path

from tests.fakes.hypervisor import FakeHypervisor
from tests.ksmtree import FakeProc
from tests.test_cli import host  # noqa: F401 - host is a fixture
from vmshare.config import Config
from vmshare.daemon.exporter import SnapshotSource
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs


def test_a_snapshot_reads_each_vms_backends_once(
        host: tuple[FakeHypervisor, FakeProc]) -> None:  # noqa: F811
    """The host view and the policy survey of one snapshot share one reading of
    each VM's facts, backends and mappings (libvirt, QMP and smaps)."""
    hv, fake = host
    source = SnapshotSource(hv, KsmSysfs(Path(os.environ["VMSHARE_SYSFS_ROOT"])),
                            ProcFs(fake.root), Config(path=None))
    hv.reads.clear()
    snap = source()
    assert set(snap.policy) == {"web-1", "web-2", "db-secret"}, snap.errors
    backends = {k: n for k, n in hv.reads.items() if k[0] == "ram_backends"}
    assert backends and set(backends.values()) == {1}, hv.reads
    facts = {k: n for k, n in hv.reads.items() if k[0] == "facts"}
    assert {vm for _, vm in facts} >= set(snap.policy) and set(facts.values()) == {1}, \
        hv.reads
