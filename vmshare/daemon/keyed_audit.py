"""Audit records of the daemon's actions that carry an id and are never written twice.

An action is written to the state file as ``pending`` before it is made; its
records' ids derive from that pending entry's key, so a daemon killed between
acting and auditing writes each record once when it finds the action done on
restart (Reconciler.complete_pending), never a second time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vmshare.records.audit import AuditLog, AuditRecord


class KeyedAudit(AuditLog):
    """An AuditLog whose records carry an id made from the action's key and the
    record's target and value, and which never writes an id twice."""

    def __init__(self, path: Path, actor: str, key: str, known: set[str]) -> None:
        super().__init__(path, actor)
        self.key = key
        self.known = known

    def record(self, action: str, target: str, before: Any, after: Any, reason: str, *,
               event: str | None = None, vm: str | None = None,
               id: str | None = None) -> AuditRecord:
        rid = id or record_id(self.key, target, after)
        rec = AuditRecord(time=time.time(), actor=self.actor, user="", pid=0, action=action,
                          target=target, before=before, after=after, reason=reason,
                          event=event, vm=vm, id=rid)
        if rid in self.known:
            return rec
        rec = super().record(action, target, before, after, reason, event=event, vm=vm,
                             id=rid)
        self.known.add(rid)
        return rec


def record_id(key: str, target: str, after: Any) -> str:
    return f"{key}/{target}/{str(after).lower()}"
