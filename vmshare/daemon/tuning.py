"""The KSM tuner inside the daemon (``[daemon] tune`` or ``daemon --tune``).

Split from the runner: the tuner's loop is vmshare.tuner.loop; this is only
its seat in the daemon (the worker thread, the lock, the audit actor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from vmshare.config import DaemonSettings
from vmshare.control.lock import ControlBusy, control_lock
from vmshare.daemon.reconcile import Reconciler
from vmshare.errors import UsageError, VmshareError

if TYPE_CHECKING:
    from vmshare.tuner.decide import Decision, Observation
    from vmshare.tuner.loop import Changes, Tuner

T = TypeVar("T")


class TunerSeat(Protocol):
    """What the tuner needs of the daemon (the runner's Daemon is one): its
    settings, its reconciler's adapters, and its worker thread."""

    settings: DaemonSettings

    @property
    def rc(self) -> Reconciler:
        ...

    async def work(self, fn: Callable[[], T]) -> T:
        ...

log = logging.getLogger("vmshare.daemon")


async def run_tuner(daemon: TunerSeat, stop: asyncio.Event) -> None:
    """The KSM tuner's loop (vmshare.tuner.loop), in the worker thread between
    reconciles: it owns run, pages_to_scan and sleep_millisecs while the
    daemon runs, audit-logs each change as actor "tuner", never unmerges,
    and leaves the knobs as they are when the daemon stops."""
    from vmshare.config import TunerPolicy
    from vmshare.records.audit import AuditLog
    from vmshare.tuner.loop import OWNED_KNOBS, Tuner, check_advisor, tuner_lock

    rc = daemon.rc
    audit = AuditLog(daemon.settings.audit_log, actor="tuner")
    policy = TunerPolicy(cpu_budget_pct=daemon.settings.tune_cpu_budget)
    held = contextlib.ExitStack()

    def setup() -> Tuner:
        try:
            check_advisor(rc.sysfs, False, False, audit)
        except UsageError as exc:
            raise UsageError("the kernel's KSM advisor is on (advisor_mode=scan-time) "
                             "and owns pages_to_scan; switch it off (vmshare ksm set "
                             "advisor_mode=none) to let the daemon tune") from exc
        held.enter_context(tuner_lock())
        tuner = Tuner(rc.sysfs, rc.procfs, policy, audit)
        # Scan at the budget at once (the first step measures the real cost);
        # if a command holds the control lock, the first step acts instead.
        try:
            with control_lock("vmshare daemon: tuner start"):
                tuner.start(act_now=True)
        except ControlBusy as exc:
            log.info("KSM tuner: %s; acting from the first step", exc)
            tuner.start()
        return tuner

    with held:
        try:
            tuner = await daemon.work(setup)
        except (VmshareError, OSError) as exc:
            log.error("KSM tuner not started: %s", exc)
            return
        log.info("KSM tuner: owning %s, a decision every %g s, ksmd CPU budget %g%% "
                 "of a core", ", ".join(OWNED_KNOBS), daemon.settings.tune_interval,
                 policy.cpu_budget_pct)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), daemon.settings.tune_interval)
            if stop.is_set():
                return
            try:
                _obs, decision, changes = await daemon.work(lambda: _locked_step(tuner))
            except (VmshareError, OSError) as exc:
                log.warning("KSM tuner: %s", exc)
                continue
            if changes:
                log.info("KSM tuner %s: %s (%s)", decision.mode,
                         ", ".join(f"{n} {b} -> {a}" for n, b, a in changes),
                         decision.reason)


def _locked_step(tuner: Tuner) -> tuple[Observation, Decision, Changes | None]:
    """One tuner step under the host's control lock (a command changing knobs
    at the same moment waits, and the reverse). Raises ControlBusy."""
    with control_lock("vmshare daemon: tune step"):
        return tuner.step()
