"""Adopt: bring a domain's persistent definition under vmshare's merge control.

QEMU's machine default ``mem-merge=on`` makes every RAM block of the process
mergeable (VRAM, ROMs) and only the RAM backends' ``merge`` can be turned off
at run time. A domain with libvirt's ``<memoryBacking><nosharepages/>``
starts QEMU with ``mem-merge=off``: nothing is mergeable, and vmshare turns
merging on per RAM backend (``qom-set /objects/<id> merge true``). So vmshare
adds ``<nosharepages/>`` to the domains it manages and records that it did,
while an operator's own ``<nosharepages/>`` is recorded as theirs and keeps
meaning "never merge" (vmshare.hypervisor.metadata).
"""

from __future__ import annotations

from vmshare.errors import UsageError
from vmshare.hypervisor.base import DefinitionStore, Hypervisor
from vmshare.model import Adoption, VmRef
from vmshare.records.audit import AuditLog


def adopt(hv: Hypervisor, ref: VmRef, *, audit: AuditLog | None,
          reason: str = "vmshare policy adopt") -> Adoption:
    """Adopt one domain; a written definition is audited (action "adopt").

    Raises UsageError (an adapter without persistent definitions: plain
    QEMU), DomainNotFound, PolicyError, DeadlineExceeded, HypervisorError.
    """
    if not isinstance(hv, DefinitionStore):
        raise UsageError("adopting changes a libvirt domain's persistent definition; a "
                         "plain QEMU is adopted by starting it with -machine mem-merge=off")
    result = hv.adopt(ref)
    if result.changed and audit is not None:
        audit.record("adopt", ref.name, None, f"nosharepages={result.outcome}"
                     if result.outcome == "operator" else "nosharepages=vmshare",
                     reason, vm=ref.name)
    return result


def describe(a: Adoption) -> str:
    """One line an operator reads: what adoption did and what is left to do."""
    if a.outcome == "adopted":
        then = ("restart the guest so that QEMU starts with mem-merge=off (until then its "
                "VRAM and ROMs stay mergeable)" if a.running
                else "QEMU starts with mem-merge=off from its next start")
        return f"{a.vm}: adopted: <nosharepages/> added to its persistent definition; {then}"
    if a.outcome == "already":
        return f"{a.vm}: already adopted"
    if a.outcome == "operator":
        when = "recorded" if a.changed else "recorded before"
        return (f"{a.vm}: its <nosharepages/> is the operator's ({when}): never merged")
    if a.outcome == "transient":
        return (f"{a.vm}: transient domain (no persistent definition): not adopted; unless "
                "it is started from a definition with <memoryBacking><nosharepages/>, its "
                "QEMU runs with mem-merge=on and its VRAM and ROMs stay mergeable")
    return f"{a.vm}: confidential guest (launchSecurity): never merged, nothing to adopt"
