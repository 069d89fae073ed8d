"""Decide: which VMs' RAM should be mergeable. Pure functions, no I/O.

Sources of policy, strongest first:
1. what the domain can never do: the operator's ``<nosharepages/>`` (not one
   vmshare added when adopting the domain: see vmshare.hypervisor.metadata),
   a confidential guest (launchSecurity), an ineligible backend: never
   merged, whatever is asked;
2. the host-wide switch (``[host] enabled = false``): nothing is merged;
3. the domain's own metadata element (``vmshare policy set``): merge
   on/off/inherit, trust group, force;
4. the host config's ``[vm."NAME-or-UUID"]`` table;
5. the host default (``[host] default_merge``), shipped as "off".

Trust groups: kernel KSM merges across every mergeable area on the host, so
VMs of two different trust groups being mergeable at the same time could
share pages with each other, the precondition of cross-VM side channels
(Flush+Reload, Dedup Est Machina). "Mergeable" means any mapping of the VM's
QEMU process, not only its RAM backends: under QEMU's default mem-merge=on
its VRAM and ROMs are mergeable too, and a guest can probe through its VRAM.
vmshare therefore lets only one trust group be mergeable at a time. A VM
whose policy carries ``force`` is exempt and the refusal message says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmshare.config import (
    HostPolicy,
    VmPolicy,
)
from vmshare.errors import TrustGroupConflict
from vmshare.model import VmFacts


@dataclass(frozen=True)
class Decision:
    """What one VM's RAM should be, and the one-line reason an operator reads."""

    vm: str
    merge: bool
    group: str
    reason: str
    forced: bool = False


def effective(facts: VmFacts, own: VmPolicy | None, host: HostPolicy) -> Decision:
    """The VM's wish before trust groups are considered."""
    name = facts.ref.name
    table = host.vms.get(name) or host.vms.get(facts.ref.uuid)
    group = (own.group if own and own.group else None) \
        or (table.group if table and table.group else None) or host.default_group
    forced = bool((own and own.force) or (table and table.force))
    if facts.ineligible_reason:
        return Decision(name, False, group, f"never merged: {facts.ineligible_reason}")
    if not host.enabled:
        return Decision(name, False, group, "host-wide switch is off ([host] enabled = false)")
    if own is not None and own.merge != "inherit":
        return Decision(name, own.merge == "on", group,
                        f"domain metadata says merge={own.merge}", forced)
    if table is not None and table.merge != "inherit":
        return Decision(name, table.merge == "on", group,
                        f"host config says merge={table.merge}", forced)
    return Decision(name, host.default_merge == "on", group,
                    f"host default merge={host.default_merge}", forced)


def blocking_vm(decision: Decision, mergeable_now: Mapping[str, str]) -> str | None:
    """A currently mergeable VM of another trust group that blocks ``decision``."""
    if not decision.merge or decision.forced:
        return None
    for other in sorted(mergeable_now):
        if other != decision.vm and mergeable_now[other] != decision.group:
            return other
    return None


def check_trust_groups(decision: Decision, mergeable_now: Mapping[str, str],
                       exposed: Mapping[str, int] | None = None) -> None:
    """Raise TrustGroupConflict naming the VM that blocks making ``decision.vm``
    mergeable; ``mergeable_now`` maps mergeable VMs to their trust groups,
    ``exposed`` those mergeable only outside their RAM backends to the bytes
    that are (QEMU's mem-merge=on: VRAM, ROMs), which disabling cannot fix."""
    other = blocking_vm(decision, mergeable_now)
    if other is None:
        return
    prefix = (f"refusing to make {decision.vm} (trust group {decision.group!r}) mergeable: "
              f"{other} of trust group {mergeable_now[other]!r} is mergeable")
    if exposed and other in exposed:
        raise TrustGroupConflict(
            f"{prefix} ({exposed[other] // 1024:,} KiB of its QEMU outside its RAM "
            "backends: VRAM, ROMs under QEMU's mem-merge=on), and KSM would let the two "
            f"share pages; bring {other} to <nosharepages/> ('vmshare policy adopt "
            f"{other}') and restart it, or set force in the policy")
    raise TrustGroupConflict(
        f"{prefix}, and KSM would let the two share pages; disable it first, or set "
        "force in the policy")


def plan(wishes: Sequence[Decision], mergeable_now: Mapping[str, str]) -> list[Decision]:
    """Resolve the whole host's wishes into decisions that respect trust groups.

    The group that already has mergeable (unforced) VMs keeps the right to
    merge; if none has, the group with the most VMs asking wins (ties by
    name). VMs of other groups are decided off, with the blocking VM named.
    """
    asking = [w for w in wishes if w.merge and not w.forced]
    holders: dict[str, int] = {}
    for vm, group in mergeable_now.items():
        if any(w.vm == vm and w.merge and not w.forced for w in wishes):
            holders[group] = holders.get(group, 0) + 1
    counts: dict[str, int] = {}
    for w in asking:
        counts[w.group] = counts.get(w.group, 0) + 1
    if not asking:
        return list(wishes)
    winner = min(counts, key=lambda g: (-holders.get(g, 0), -counts[g], g))
    first_of_winner = sorted(w.vm for w in asking if w.group == winner)[0]
    out = []
    for w in wishes:
        if w.merge and not w.forced and w.group != winner:
            out.append(Decision(w.vm, False, w.group,
                                f"blocked: trust group {winner!r} is merging "
                                f"({first_of_winner}); {w.reason}"))
        else:
            out.append(w)
    return out
