"""Guests whose RAM is a private file or memfd mapping (libvirt's
``<memoryBacking><source type='file|memfd'/><access mode='private'/>``: QEMU
memory-backend-file/-memfd with share=off). Kernel KSM merges the pages such a
guest has written, so vmshare must call them eligible, control them, attribute
their savings, and predict them from their anonymous pages only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from integration.domains import domain_name
from integration.ksm_fixtures import converge, kernel_ksm
from vmshare.cli.main import main
from vmshare.engine import EngineConfig, KsmEngine
from vmshare.guest import FillSpec
from vmshare.hypervisor.metadata import adopted_element
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.observe.host import Observer
from vmshare.prediction.predict import domain_target, run_until_converged

__all__ = ["kernel_ksm"]
pytestmark = pytest.mark.integration

MIB = 2**20
MEMORY_MIB = 256
SPEC = FillSpec(identical_mib=96, unique_mib=24, zero_mib=0, seed=31)
GUESTS = {domain_name("privfile"): "file", domain_name("privmemfd"): "memfd"}


@pytest.fixture
def private_guests(boot_guests: Callable[..., list[Any]]) -> dict[str, str]:
    for name, source in GUESTS.items():
        # adopted (<nosharepages/>: QEMU mem-merge=off), so that disable can make
        # the whole QEMU unmergeable and vmshare turns merging on per backend
        boot_guests([name], SPEC, memory_mib=MEMORY_MIB, memory_source=source,
                    memory_access="private", nosharepages=True,
                    metadata_xml=adopted_element())
    return GUESTS


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc: dict[str, Any] = json.loads(captured.out)
    return doc


def test_private_file_and_memfd_guests_are_merged_and_counted(
        private_guests: dict[str, str], kernel_ksm: KsmSysfs,
        capsys: pytest.CaptureFixture[str]) -> None:
    names = list(private_guests)
    listed = {vm["name"]: vm for vm in cli_json(capsys, "list")["vms"]}
    for name, source in private_guests.items():
        (backend,) = listed[name]["backends"]
        assert backend["type"] == f"memory-backend-{source}"
        assert backend["share"] is False
        assert backend["eligible"] is True, backend["ineligible_reason"]
    # control: off and on again, each verified through the mapping's mg flag
    for name in names:
        assert cli_json(capsys, "disable", name)["changes"][0]["after"] is False
    listed = {vm["name"]: vm for vm in cli_json(capsys, "list")["vms"]}
    assert all(listed[n]["backends"][0]["mg"] is False for n in names)
    for name in names:
        assert cli_json(capsys, "enable", name)["changes"][0]["after"] is True

    converge(kernel_ksm, timeout=300)
    doc = cli_json(capsys, "status", *names)
    vms = {vm["name"]: vm for vm in doc["vms"]}
    sharing = doc["host"]["pages_sharing"]
    assert sharing >= SPEC.identical_mib * 256 * 0.95
    # the per-VM fair shares add up to the host's figure: nothing is missed
    saved = sum(vms[n]["saved_bytes"] for n in names)
    assert saved == pytest.approx(sharing * 4096, rel=0.01)
    # the identical region, plus what the two guest kernels share (the same kernel
    # and initramfs in both: about 16 MiB measured)
    a, b = names
    assert SPEC.identical_mib * MIB * 0.95 <= vms[a]["shares_with"][b] \
        <= (SPEC.identical_mib + 24) * MIB

    # predict reads only the guests' private copies, and agrees with the kernel
    from vmshare.hypervisor import connect

    hv = connect("qemu:///system")
    try:
        observer = Observer(hv, kernel_ksm, ProcFs())
        targets = [domain_target(hv, observer, n) for n in names]
        engine = KsmEngine(EngineConfig())
        run_until_converged(engine, targets, max_scans=6)
        kernel_after = kernel_ksm.counters()
    finally:
        with contextlib.suppress(Exception):
            hv.close()
    assert engine.counters().pages_sharing == pytest.approx(
        (sharing + kernel_after["pages_sharing"]) / 2, rel=0.03)
