"""The vmshare daemon: reconcile running VMs with their policy, from lifecycle events.

Modules:

* ``state``: the state file (last observed KSM pages, re-merge records,
  actions in flight), written atomically;
* ``triggers``: what each libvirt lifecycle event, QMP event and hook spool
  entry means for a VM (apply its policy, forget it, or also reset its merges);
* ``reconcile``: decide and act for one VM or all of them, idempotently,
  recording each real change in the audit log (``keyed_audit``: records with
  ids, never written twice across a SIGKILL);
* (libvirt's events come from the adapter vmshare.hypervisor.libvirt_events,
  turned into triggers by the runner;)
* ``qmp_watch``: plain QEMU: polls QMP socket globs (sessions and ``QmpFleet``
  are in vmshare.hypervisor.qmp_fleet) and turns what changed into triggers;
* ``spool``: the hook's spool directory and wake-up datagrams;
* ``runner``: the asyncio main loop tying them together;
* ``service``: the entry point (logging, signals), the only module here that
  writes to the terminal.

May import control, policy, tuner, observe, records, present, the adapters,
config, model and errors; only ``vmshare.cli`` imports it.
"""
