"""vmshare.policy.rules: effective() precedence and plan() trust-group resolution."""

from __future__ import annotations

import pytest

from vmshare.config import HostPolicy, VmPolicy
from vmshare.errors import PolicyError, TrustGroupConflict
from vmshare.model import VmFacts, VmRef
from vmshare.policy.rules import Decision, blocking_vm, check_trust_groups, effective, plan


def facts(name: str = "vm1", *, nosharepages: bool = False, sev: bool = False) -> VmFacts:
    return VmFacts(ref=VmRef(name, f"uuid-{name}", 1, True), pid=100,
                   nosharepages=nosharepages, launch_security=sev)


def test_host_default_applies_when_nothing_is_set() -> None:
    d = effective(facts(), None, HostPolicy())
    assert (d.merge, d.group, d.forced) == (False, "default", False)
    assert d.reason == "host default merge=off"
    d = effective(facts(), VmPolicy(), HostPolicy(default_merge="on", default_group="g"))
    assert (d.merge, d.group, d.reason) == (True, "g", "host default merge=on")


def test_config_table_by_name_or_uuid_beats_default() -> None:
    host = HostPolicy(default_merge="off", vms={"vm1": VmPolicy("on", "t")})
    d = effective(facts(), None, host)
    assert (d.merge, d.group, d.reason) == (True, "t", "host config says merge=on")
    host = HostPolicy(default_merge="on", vms={"uuid-vm1": VmPolicy("off")})
    assert effective(facts(), None, host).reason == "host config says merge=off"
    # a table with merge=inherit still lends its group, the default decides merge
    host = HostPolicy(default_merge="on", vms={"vm1": VmPolicy("inherit", "t")})
    d = effective(facts(), None, host)
    assert (d.merge, d.group, d.reason) == (True, "t", "host default merge=on")


def test_metadata_beats_config_table() -> None:
    host = HostPolicy(vms={"vm1": VmPolicy("on", "table-group", force=False)})
    d = effective(facts(), VmPolicy("off", "meta-group"), host)
    assert (d.merge, d.group, d.reason) == (False, "meta-group", "domain metadata says merge=off")
    # metadata inherit: the table decides, metadata's group still wins
    d = effective(facts(), VmPolicy("inherit", "meta-group"), host)
    assert (d.merge, d.group, d.reason) == (True, "meta-group", "host config says merge=on")
    # no group in metadata: the table's group
    assert effective(facts(), VmPolicy("on"), host).group == "table-group"


def test_force_from_either_source() -> None:
    host = HostPolicy(vms={"vm1": VmPolicy("on", force=True)})
    assert effective(facts(), None, host).forced
    assert effective(facts(), VmPolicy("on", force=True), HostPolicy()).forced
    assert not effective(facts(), VmPolicy("on"), HostPolicy()).forced


def test_host_switch_beats_metadata_and_table() -> None:
    host = HostPolicy(enabled=False, default_merge="on", vms={"vm1": VmPolicy("on")})
    d = effective(facts(), VmPolicy("on", force=True), host)
    assert not d.merge and "host-wide switch is off" in d.reason


def test_ineligible_domain_beats_everything() -> None:
    host = HostPolicy(enabled=False, default_merge="on")
    d = effective(facts(nosharepages=True), VmPolicy("on", force=True), host)
    assert not d.merge and d.reason.startswith("never merged: <memoryBacking><nosharepages/>")
    d = effective(facts(sev=True), VmPolicy("on"), HostPolicy(default_merge="on"))
    assert not d.merge and "confidential guest" in d.reason


def test_vm_policy_validation() -> None:
    with pytest.raises(PolicyError, match="merge must be one of"):
        VmPolicy(merge="yes")  # type: ignore[arg-type]
    for bad in ("", "a b", "x" * 65, "tenant/a"):
        with pytest.raises(PolicyError, match="bad trust group name"):
            VmPolicy(group=bad)
    assert VmPolicy(group="Tenant_a-1.x").group == "Tenant_a-1.x"


def wish(vm: str, group: str, merge: bool = True, forced: bool = False) -> Decision:
    return Decision(vm, merge, group, "asked", forced)


def test_plan_nobody_asking_is_unchanged() -> None:
    wishes = [wish("a", "g1", False), wish("b", "g2", False)]
    assert plan(wishes, {}) == wishes


def test_plan_group_already_merging_holds_the_right() -> None:
    wishes = [wish("a1", "small"), wish("b1", "big"), wish("b2", "big"), wish("b3", "big")]
    out = {d.vm: d for d in plan(wishes, {"a1": "small"})}
    assert out["a1"].merge
    for vm in ("b1", "b2", "b3"):
        assert not out[vm].merge
        assert out[vm].reason == "blocked: trust group 'small' is merging (a1); asked"


def test_plan_holder_must_still_want_to_merge() -> None:
    # a1 is mergeable but its policy now says off: it holds nothing
    wishes = [wish("a1", "small", merge=False), wish("b1", "big")]
    out = {d.vm: d for d in plan(wishes, {"a1": "small"})}
    assert out["b1"].merge and not out["a1"].merge


def test_plan_most_askers_win_then_name_breaks_ties() -> None:
    out = {d.vm: d for d in plan([wish("x", "g2"), wish("y", "g2"), wish("z", "g1")], {})}
    assert out["x"].merge and out["y"].merge and not out["z"].merge
    assert "trust group 'g2' is merging (x)" in out["z"].reason
    out = {d.vm: d for d in plan([wish("p", "beta"), wish("q", "alpha")], {})}
    assert out["q"].merge and not out["p"].merge          # tie: 'alpha' < 'beta'
    assert "'alpha' is merging (q)" in out["p"].reason


def test_plan_forced_vms_are_exempt_and_do_not_count() -> None:
    wishes = [wish("f1", "other", forced=True), wish("f2", "other", forced=True),
              wish("a", "g")]
    out = {d.vm: d for d in plan(wishes, {"f1": "other"})}
    assert out["f1"].merge and out["f2"].merge and out["a"].merge


def test_check_trust_groups_names_the_blocker_and_both_groups() -> None:
    d = wish("new", "tenant-b")
    with pytest.raises(TrustGroupConflict) as err:
        check_trust_groups(d, {"old": "tenant-a", "same": "tenant-b"})
    msg = str(err.value)
    assert "new" in msg and "old" in msg and "'tenant-a'" in msg and "'tenant-b'" in msg
    assert "\n" not in msg
    check_trust_groups(d, {"same": "tenant-b", "new": "tenant-a"})      # itself never blocks
    check_trust_groups(wish("new", "tenant-b", forced=True), {"old": "tenant-a"})
    check_trust_groups(wish("new", "tenant-b", merge=False), {"old": "tenant-a"})
    assert blocking_vm(d, {"z": "x", "b": "y"}) == "b"                 # sorted, first
