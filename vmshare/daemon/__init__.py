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
* ``spool``: the hook's spool directory (entries validated, bad ones set aside);
* ``wakeup``: the hook's wake-up datagram socket;
* ``rejects``: refused input, counted and logged at a bounded rate;
* ``keyed_audit``: audit records with ids, written at most once per action;
* ``exporter``: the metrics snapshot (vmshare metrics and the daemon);
* ``sketcher``: this host's content sketch kept fresh (``[sketch] interval``);
* ``runner``: the asyncio main loop tying them together, with ``supervisor``
  (background tasks restarted, never silently dead) and ``tuning`` (the KSM
  tuner's seat in the daemon);
* ``notify`` (systemd's notify protocol, spoken directly) and ``liveness``
  (READY, the watchdog that stops when the loop or the worker is stuck, and
  the STATUS line);
* ``service``: the entry point (logging, signals, the notify messages), the
  only module here that writes to the terminal.

May import control, policy, tuner, observe, records, present, the adapters,
config, model and errors; only ``vmshare.cli`` imports it.
"""
