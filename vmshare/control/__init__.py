"""Act: the one path that changes a VM's merge state (``merge``: policy check,
act, verify, audit) and the kernel's KSM knobs (``knobs``: validate, safe
unmerge, roll back). The CLI and the daemon both call it.

May import policy, observe, records, the adapters (hypervisor, ksm), config,
model and errors.
"""
