"""libvirt's event-loop callbacks marshalled onto the daemon's asyncio loop,
and a closed loop (daemon stopping) absorbing them instead of raising."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from vmshare.hypervisor.libvirt_events import LoopMarshal


def test_on_the_loop_thread_the_call_runs_directly() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert LoopMarshal(loop)(lambda a, b: a + b, 2, 3, wait=True) == 5
    finally:
        loop.close()


def test_from_another_thread_the_call_runs_on_the_loop() -> None:
    loop = asyncio.new_event_loop()
    marshal = LoopMarshal(loop)
    ran_on: list[int] = []
    got: list[Any] = []

    def callback(x: int) -> int:
        ran_on.append(threading.get_ident())
        return x * 2

    def other() -> None:
        got.append(marshal(callback, 21, wait=True))
        got.append(marshal(callback, 1, wait=False))
        loop.call_soon_threadsafe(loop.stop)

    t = threading.Thread(target=other)
    t.start()
    loop.run_forever()
    t.join()
    loop.close()
    assert got == [42, 0]
    assert ran_on == [threading.get_ident()] * 2


def test_a_closed_loop_absorbs_updates_and_refuses_new_handles() -> None:
    loop = asyncio.new_event_loop()
    marshal = LoopMarshal(loop)
    loop.close()
    calls: list[int] = []
    assert marshal(calls.append, 1, wait=False) == 0
    assert marshal(calls.append, 2, wait=True) == -1
    results: list[Any] = []
    t = threading.Thread(target=lambda: results.append(marshal(calls.append, 3, wait=True)))
    t.start()
    t.join()
    assert results == [-1] and calls == []
