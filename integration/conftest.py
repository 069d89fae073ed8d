"""Shared fixtures for tests that boot real guests (plain QEMU and libvirt, always TCG).

Preconditions skip with a stated reason only when a part is truly absent
(no QEMU binary, no libvirt); a part that is installed but not working (say,
libvirtd not started) is a failure pointing at integration/setup.sh.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from integration.domains import LIBVIRT_URI, destroy_by_uuid
from integration.second_host import SecondHost, second_libvirtd
from vmshare.guest import FillSpec, GuestImage, build_image, domain_xml, wait_ready

SETUP_HINT = "run integration/setup.sh"


def kill_process_group(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM the process group ``proc`` leads, then SIGKILL it; always reaps ``proc``.

    ``proc`` must have been started with ``start_new_session=True``.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # Children of the group may outlive the leader; SIGKILL whatever is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (reads /proc/<pid>/mem of QEMU, writes /var/cache/vmshare)")


@pytest.fixture(scope="session")
def require_qemu(require_root: None) -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.skip(f"qemu-system-x86_64 is not installed ({SETUP_HINT})")
    return path


@pytest.fixture(scope="session")
def guest_image(require_root: None) -> GuestImage:
    """The test guest, built once per session (cached across sessions)."""
    return build_image()


@pytest.fixture
def qemu_launcher(require_qemu: str) -> Iterator[Callable[[list[str]], subprocess.Popen[bytes]]]:
    """Start QEMU processes in their own process group; all are killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def launch(argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        started.append(proc)
        return proc

    try:
        yield launch
    finally:
        for proc in started:
            kill_process_group(proc)
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.fixture(scope="module")
def libvirt_conn(require_root: None) -> Iterator[Any]:
    """An open qemu:///system connection, one per test module: a module that
    restarts libvirtd (the daemon's reconnect test, last in its module) must
    not leave later modules a dead connection.

    Deliberately no sweep of leftover ``vmshare-it-`` domains here: test
    sessions run concurrently on one libvirtd, and a sweep at session start
    destroys the guests another session is still using.
    """
    if shutil.which("libvirtd") is None:
        pytest.skip(f"libvirtd is not installed ({SETUP_HINT})")
    try:
        import libvirt
    except ImportError:
        pytest.skip(f"libvirt-python is not installed ({SETUP_HINT})")
    # libvirt prints every error to stderr unless a handler is set; we get them as exceptions.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd installed but {LIBVIRT_URI} does not answer ({SETUP_HINT}): {exc}")
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def transient_domains(libvirt_conn: Any) -> Iterator[Callable[[str], Any]]:
    """createXML transient domains; every one is destroyed at teardown, even on
    failure, by the UUID createXML returned (recorded only once it succeeded:
    a name taken by another run must not make us destroy that run's guest).
    Name them with integration.domains.domain_name."""
    import libvirt

    created: list[Any] = []

    def create(xml: str) -> Any:
        dom = libvirt_conn.createXML(xml, 0)
        created.append(dom)
        return dom

    try:
        yield create
    finally:
        for dom in created:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            # the object may belong to a connection that died with a libvirtd
            # restart, or the guest was saved and restored: by UUID, afresh
            destroy_by_uuid(dom.UUIDString())
        deadline = time.monotonic() + 10
        while any(_active(dom) for dom in created) and time.monotonic() < deadline:
            time.sleep(0.1)


def _active(dom: Any) -> bool:
    import libvirt

    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


BootGuests = Callable[..., list[Any]]


@pytest.fixture
def boot_guests(guest_image: GuestImage, transient_domains: Callable[[str], Any],
                tmp_path_factory: pytest.TempPathFactory) -> BootGuests:
    """``boot(names, spec, **domain_xml options)`` starts libvirt guests of the
    test image (serial consoles in a temporary directory), waits until each is
    ready (240 s) and returns their domains; each is destroyed by UUID at
    teardown (``transient_domains``). Give names from ``domain_name``."""
    consoles = tmp_path_factory.mktemp("consoles")

    def boot(names: Sequence[str], spec: FillSpec, **options: Any) -> list[Any]:
        domains = [transient_domains(domain_xml(name, guest_image, spec,
                                                console_log=consoles / f"{name}.log",
                                                **options))
                   for name in names]
        for name in names:
            wait_ready(consoles / f"{name}.log", timeout=240)
        return domains

    return boot


@pytest.fixture(scope="session")
def second_host(require_root: None) -> Iterator[SecondHost]:
    """A second libvirt host on this machine (integration/second_host.py): its own
    libvirtd, virtlogd, host UUID and mount namespace, vmshare's hook in its qemu.d."""
    if shutil.which("libvirtd") is None or shutil.which("unshare") is None:
        pytest.skip(f"libvirtd or unshare is not installed ({SETUP_HINT})")
    with second_libvirtd() as host:
        yield host
