"""Act: the one path that changes a VM's merge state (``merge``: policy check,
act, verify, audit; the CLI and the daemon both call it), the kernel's KSM
knobs (``knobs``: validate, safe unmerge, roll back), and a domain's
persistent definition (``adopt``: ``<nosharepages/>``, so that QEMU starts
with nothing mergeable and vmshare turns merging on per RAM backend).

May import policy, observe, records, the adapters (hypervisor, ksm), config,
model and errors.
"""
