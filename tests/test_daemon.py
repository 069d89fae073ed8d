from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from vmshare.daemon import triggers as t
from vmshare.daemon.qmp_watch import Snapshot, transitions
from vmshare.daemon.state import StateStore


def test_libvirt_codes_match_the_bindings() -> None:
    libvirt = pytest.importorskip("libvirt")
    assert t.EV_STARTED == libvirt.VIR_DOMAIN_EVENT_STARTED
    assert t.EV_STOPPED == libvirt.VIR_DOMAIN_EVENT_STOPPED
    assert t.EV_RESUMED == libvirt.VIR_DOMAIN_EVENT_RESUMED
    assert t.STARTED_RESTORED == libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED
    assert t.STARTED_MIGRATED == libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED
    assert t.RESUMED_MIGRATED == libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED


def test_event_mapping() -> None:
    r = t.lifecycle_trigger("vm", "u", t.EV_STARTED, t.STARTED_RESTORED)
    assert r is not None and r.action == "apply" and r.resets == "restore"
    r = t.lifecycle_trigger("vm", "u", t.EV_STARTED, t.STARTED_BOOTED)
    assert r is not None and r.resets is None
    r = t.lifecycle_trigger("vm", "u", t.EV_STOPPED, 4)
    assert r is not None and r.action == "forget"
    assert t.lifecycle_trigger("vm", "u", t.EV_SUSPENDED, 0) is None
    reset = t.qmp_trigger("vm", None, "RESET", {})
    assert reset is not None and reset.resets == "reset"
    mig = t.qmp_trigger("vm", None, "MIGRATION", {"status": "completed"})
    assert mig is not None and mig.check_incoming and mig.resets == "migrate-in"
    assert t.qmp_trigger("vm", None, "MIGRATION", {"status": "active"}) is None
    unplug = t.qmp_trigger("vm", None, "DEVICE_DELETED", {"path": "/machine/peripheral/dimm0"})
    assert unplug is not None and unplug.resets == "hotplug"
    assert t.device_added_trigger("vm", None, "dimm0").resets == "hotplug"


def _through_libvirt(events: list[tuple[str, object, object]]) -> list[t.Trigger]:
    """What the libvirt adapter's events become, in order (the daemon acts on the
    first; the audit record names the reset that trigger carries)."""
    out: list[t.Trigger] = []
    sink = t.TriggerSink(out.append, lambda _reason: None)
    for kind, a, b in events:
        if kind == "qmp":
            assert isinstance(a, str) and isinstance(b, dict)
            sink.qmp_event("vm", "u", a, b)
        else:
            assert isinstance(a, int) and isinstance(b, int)
            sink.lifecycle("vm", "u", a, b)
    return out


def test_a_restore_through_libvirt_is_named_restore_not_migrate_in() -> None:
    # the order libvirtd 9.0 delivers them in on `virsh restore`: QEMU's MIGRATION
    # (a restore is an incoming migration from a file), then libvirt's own event
    restore = _through_libvirt([("qmp", "MIGRATION", {"status": "completed"}),
                                ("life", t.EV_STARTED, t.STARTED_RESTORED),
                                ("qmp", "RESUME", {}),
                                ("life", t.EV_RESUMED, t.RESUMED_UNPAUSED)])
    assert [x.resets for x in restore if x.resets] == ["restore"]
    assert restore[0].resets == "restore"
    incoming = _through_libvirt([("life", t.EV_STARTED, t.STARTED_MIGRATED),
                                 ("qmp", "MIGRATION", {"status": "completed"}),
                                 ("life", t.EV_RESUMED, t.RESUMED_MIGRATED)])
    assert [x.resets for x in incoming] == ["migrate-in", "migrate-in"]
    assert "MIGRATION" not in t.QMP_EVENTS


def test_hook_sequence_of_a_restore() -> None:
    seq = t.HookSequence()
    calls = [("stopped", "end"), ("release", "end"), ("restore", "begin"),
             ("prepare", "begin"), ("start", "begin"), ("started", "begin")]
    out = [seq.feed("vm", None, op, sub) for op, sub in calls]
    assert [o.action if o else None for o in out] == \
        ["forget", "forget", None, None, None, "apply"]
    assert out[-1] is not None and out[-1].resets == "restore"
    again = seq.feed("vm", None, "started", "begin")
    assert again is not None and again.resets is None


def test_backoff_schedule() -> None:
    assert list(islice(t.backoff_delays(5.0), 6)) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_state_remerge_previous_and_dedup(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "state.json")
    s.observe("vm", "u", 100, 5000, now=10.0)
    rec = s.observe("vm", "u", 200, 0, now=20.0)     # new QEMU: qemu-restart
    assert rec is not None and rec.event == "qemu-restart" and rec.previous_ksm_pages == 5000
    assert s.reset_event("vm", "restore", 200, now=21.0) is None   # same reset, refined
    assert s.vm("vm")["remerge"]["event"] == "restore"
    assert s.vm("vm")["remerge"]["previous_ksm_pages"] == 5000
    s.observe("vm", "u", 200, 3000, now=100.0)
    rec = s.reset_event("vm", "reset", 200, now=100.0)
    assert rec is not None and rec.previous_ksm_pages == 3000
    s.save()
    assert json.loads((tmp_path / "state.json").read_text())["vms"]["vm"]["pid"] == 200


def test_state_previous_by_uuid_for_a_migration_destination(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "state.json")
    s.observe("src", "1234-5678", 1, 700, now=1.0)
    rec = s.reset_event("dst", "migrate-in", 2, now=2.0, uuid="1234-5678")
    assert rec is not None and rec.previous_ksm_pages == 700


def test_qmp_transitions() -> None:
    a = Snapshot("/s", "vm", "u", 10, "inmigrate", ("pc.ram",))
    assert transitions(None, a, "/s")[0].event == "qmp:socket-appeared/inmigrate"
    assert transitions(None, a, "/s")[0].resets is None
    r = Snapshot("/s", "vm", "u", 10, "running", ("pc.ram",))
    assert transitions(None, r, "/s")[0].event == "qmp:socket-appeared"
    b = Snapshot("/s", "vm", "u", 10, "running", ("pc.ram",))
    assert transitions(a, b, "/s")[0].resets == "migrate-in"
    c = Snapshot("/s", "vm", "u", 10, "running", ("memdimm0", "pc.ram"))
    assert transitions(b, c, "/s")[0].resets == "hotplug"
    d = Snapshot("/s", "vm", "u", 11, "running", ("pc.ram",))
    assert transitions(c, d, "/s")[0].resets == "qemu-restart"
    assert transitions(d, None, "/s")[0].action == "forget"
    assert transitions(d, d, "/s") == []


def test_restore_reported_as_migration_first_is_named_restore(tmp_path: Path) -> None:
    """libvirt restores through an incoming migration: QEMU's MIGRATION event
    may arrive before libvirt's STARTED_RESTORED. The record ends up 'restore'."""
    store = StateStore(tmp_path / "state.json")
    store.observe("vm", "u", pid=10, ksm_pages=500, now=100.0)
    first = store.reset_event("vm", "migrate-in", pid=11, now=200.0)
    assert first is not None and first.event == "migrate-in"
    assert store.reset_event("vm", "restore", pid=11, now=200.5) is None
    assert store.vm("vm")["remerge"]["event"] == "restore"
    assert store.vm("vm")["remerge"]["previous_ksm_pages"] == 500
    # ...but a less specific report never downgrades it.
    assert store.reset_event("vm", "migrate-in", pid=11, now=201.0) is None
    assert store.vm("vm")["remerge"]["event"] == "restore"
