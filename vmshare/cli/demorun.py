"""The machinery of `vmshare demo` (vmshare.cli.demo holds its parser): build
the guest image, boot the guests, make them mergeable, run kernel KSM, show the
savings, clean up. Imported only when the demo runs: it pulls in the guest
builders and the libvirt adapter.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmshare.cli.shown import DEMO_GUESTS as GUESTS
from vmshare.control.merge import Controller
from vmshare.errors import AccessDenied, KsmUnavailable, UsageError, VmshareError
from vmshare.guest import FillSpec, GuestImage, build_image, domain_xml, wait_ready
from vmshare.guest.debian import (
    DebianImage,
    build_debian_image,
    debian_domain_xml,
    make_overlay,
    wait_debian_ready,
)
from vmshare.hypervisor.libvirt import LibvirtHypervisor
from vmshare.hypervisor.metadata import adopted_element
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KnobSnapshot, KsmSysfs
from vmshare.model import PAGE_SIZE, VmRef
from vmshare.observe.host import HostView, Observer
from vmshare.present import text as report

DEMO_PREFIX = "vmshare-demo-"
DEMO_DIR = Path("/var/lib/vmshare/demo")
DEMO_DIR_ENV = "VMSHARE_DEMO_DIR"      # another directory for consoles and overlays
# Fast scanning for the demo only; every knob is restored afterwards.
DEMO_KNOBS = {"pages_to_scan": 20000, "sleep_millisecs": 20}


@dataclass(frozen=True)
class DemoOptions:
    guests: int = 3
    memory_mib: int = 256
    guest: str = "busybox"           # or "debian"
    identical_mib: int = 96
    unique_mib: int = 32
    zero_mib: int = 16
    keep: bool = False
    timeout: float = 300.0
    uri: str = "qemu:///system"


def _check(opts: DemoOptions) -> None:
    if not 2 <= opts.guests <= 8:
        raise UsageError("--guests must be between 2 and 8")
    if opts.guest not in GUESTS:
        raise UsageError(f"--guest must be one of {', '.join(GUESTS)}, not {opts.guest!r}")
    if opts.guest == "debian" and opts.memory_mib < 256:
        raise UsageError("a Debian guest needs --memory 256 or more")
    if os.geteuid() != 0:
        raise AccessDenied("the demo boots guests and drives kernel KSM: run it as root")


def run_demo(opts: DemoOptions, *, out: Callable[[str], None],
             sysfs: KsmSysfs | None = None, procfs: ProcFs | None = None) -> int:
    """Run the demo: build the image, boot, make mergeable, run KSM and wait,
    print, clean up. Returns the exit code. Raises VmshareError on failure
    (UsageError, AccessDenied, KsmUnavailable, GuestError, HypervisorError,
    KnobError among them), after cleaning up whatever it started."""
    _check(opts)
    sysfs = sysfs or KsmSysfs()
    procfs = procfs or ProcFs()
    if not sysfs.available():
        raise KsmUnavailable("kernel KSM is not available on this host: the demo needs it "
                             "(see 'vmshare predict' for the userspace engine)")
    hv = LibvirtHypervisor(opts.uri)
    started: list[VmRef] = []
    snapshot = sysfs.snapshot()
    try:
        if opts.guest == "debian":
            _boot_debian(hv, _build_debian(out), opts, started, out)
        else:
            _boot(hv, _build(out), opts, started, out)
        observer = Observer(hv, sysfs, procfs)
        _make_mergeable(Controller(hv, procfs, observer), started, out)
        _run_ksm(sysfs, out)
        _wait_merged(sysfs, opts, out)
        _show(observer.host([r.name for r in started]), opts, out)
        return 0
    finally:
        _clean_up(hv, sysfs, snapshot, started, opts.keep, out)


def _build(out: Callable[[str], None]) -> GuestImage:
    t0 = time.monotonic()
    out("Building the guest image (Debian cloud kernel + busybox initramfs)...")
    image = build_image()
    out(f"  kernel {image.kernel}\n  initrd {image.initrd}  ({time.monotonic() - t0:.1f} s)")
    return image


def _build_debian(out: Callable[[str], None]) -> DebianImage:
    t0 = time.monotonic()
    out("Building the Debian 12 guest (mmdebstrap from this host's apt mirror; cached)...")
    image = build_debian_image()
    out(f"  root disk {image.root}\n  kernel {image.kernel}  ({time.monotonic() - t0:.1f} s)")
    return image


def _boot(hv: LibvirtHypervisor, image: GuestImage, opts: DemoOptions, started: list[VmRef],
          out: Callable[[str], None]) -> None:
    """Boot the busybox demo guests, each filling its RAM as ``opts`` says."""
    spec = FillSpec(identical_mib=opts.identical_mib, unique_mib=opts.unique_mib,
                    zero_mib=opts.zero_mib, seed=1)
    out(f"Booting {opts.guests} TCG guests of {opts.memory_mib} MiB: each writes "
        f"{opts.identical_mib} MiB identical to the others, {opts.unique_mib} MiB of its "
        f"own and {opts.zero_mib} MiB of zeros...")

    def xml(name: str, log_path: Path, _demo_dir: Path) -> str:
        return domain_xml(name, image, spec, memory_mib=opts.memory_mib, console_log=log_path,
                          nosharepages=True, metadata_xml=adopted_element())

    _boot_each(hv, opts, started, xml, wait_ready, "ready", out)


def _boot_debian(hv: LibvirtHypervisor, image: DebianImage, opts: DemoOptions,
                 started: list[VmRef], out: Callable[[str], None]) -> None:
    """Boot Debian guests on qcow2 overlays of one root disk."""
    out(f"Booting {opts.guests} Debian 12 guests of {opts.memory_mib} MiB under TCG "
        "(systemd, udev, journald, dbus, cron, rsyslog)...")

    def xml(name: str, log_path: Path, demo_dir: Path) -> str:
        overlay = make_overlay(image, demo_dir / f"{name}.qcow2")
        return debian_domain_xml(name, image, overlay, memory_mib=opts.memory_mib,
                                 console_log=log_path, nosharepages=True,
                                 metadata_xml=adopted_element())

    _boot_each(hv, opts, started, xml, wait_debian_ready, "multi-user", out)


def _boot_each(hv: LibvirtHypervisor, opts: DemoOptions, started: list[VmRef],
               make_xml: Callable[[str, Path, Path], str], wait: Callable[..., object],
               ready_word: str, out: Callable[[str], None]) -> None:
    """Create every demo guest, then wait for each console to say it is ready.
    Each guest is added to ``started`` as soon as it exists, so that a failure
    part-way cleans it up."""
    demo_dir = _demo_dir()
    _refuse_running(hv)
    t0 = time.monotonic()
    logs = []
    for i in range(opts.guests):
        name = f"{DEMO_PREFIX}{i + 1}"
        log_path = demo_dir / f"{name}.console.log"
        log_path.unlink(missing_ok=True)
        started.append(hv.create_transient(make_xml(name, log_path, demo_dir)))
        logs.append(log_path)
    for ref, log_path in zip(started, logs, strict=True):
        wait(log_path, timeout=opts.timeout, pid=hv.facts(ref).pid)
        out(f"  {ref.name}: {ready_word} ({time.monotonic() - t0:.0f} s)")


def _demo_dir() -> Path:
    """Where the guests' consoles and overlays go ($VMSHARE_DEMO_DIR or DEMO_DIR)."""
    path = Path(os.environ.get(DEMO_DIR_ENV) or DEMO_DIR)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _refuse_running(hv: LibvirtHypervisor) -> None:
    for old in hv.list_vms():
        if old.name.startswith(DEMO_PREFIX) and old.running:
            raise UsageError(f"{old.name} is already running (a previous demo with "
                             f"--keep?): 'virsh destroy {old.name}' first")


def _make_mergeable(ctl: Controller, started: list[VmRef], out: Callable[[str], None]) -> None:
    for ref in started:
        for change in ctl.set_merge(ref.name, True):
            out(f"  {change.vm}/{change.backend}: mergeable (verified: QEMU merge=on, "
                "kernel mg flag set)")


def _run_ksm(sysfs: KsmSysfs, out: Callable[[str], None]) -> None:
    for name, value in DEMO_KNOBS.items():
        sysfs.set(name, value)
    sysfs.set("run", 1)
    out(f"Kernel KSM running (pages_to_scan={DEMO_KNOBS['pages_to_scan']}, "
        f"sleep_millisecs={DEMO_KNOBS['sleep_millisecs']}); waiting for pages to merge...")


def _show(host: HostView, opts: DemoOptions, out: Callable[[str], None]) -> None:
    """The per-VM savings, the sharing matrix, and what the content alone predicts."""
    for text in (report.host_summary(host), report.status_table(host), report.matrix(host)):
        out("")
        out(text)
    if opts.guest == "debian":
        out("")
        out("What real guests share: their kernels' and systemd's pages, page cache of "
            "the same files, zeroed memory.")
        return
    expected = opts.identical_mib * (opts.guests - 1) / opts.guests
    out("")
    out(f"Expected from the content alone: each guest saves about {expected:.1f} MiB of "
        f"its identical region ((n-1)/n of {opts.identical_mib} MiB), plus its share "
        "of identical kernel pages and of the merged zero pages.")


def _clean_up(hv: LibvirtHypervisor, sysfs: KsmSysfs, snapshot: KnobSnapshot,
              started: list[VmRef], keep: bool, out: Callable[[str], None]) -> None:
    """Restore every KSM knob, destroy the guests (unless ``keep``), close the
    connection. A failure here is a warning: the demo's own error (if any) is
    the one to report."""
    try:
        sysfs.restore(snapshot)
    except VmshareError as exc:
        out(f"warning: could not restore KSM knobs: {exc}")
    if not keep:
        for ref in started:
            try:
                hv.destroy(ref)
            except VmshareError as exc:
                out(f"warning: could not destroy {ref.name}: {exc}")
                continue
            # a destroyed guest's overlay holds nothing anyone needs
            (_demo_dir() / f"{ref.name}.qcow2").unlink(missing_ok=True)
        if started:
            out(f"Guests destroyed; KSM knobs restored (run={snapshot.values.get('run')}).")
    elif started:
        out("Guests left running (--keep): " + ", ".join(r.name for r in started)
            + "; KSM knobs restored.")
    hv.close()


def _wait_merged(sysfs: KsmSysfs, opts: DemoOptions, out: Callable[[str], None]) -> None:
    """Show progress per full scan until pages_sharing is unchanged over a scan."""
    deadline = time.monotonic() + opts.timeout
    start_scans = sysfs.read_int("full_scans")
    last = -1
    while True:
        scans = sysfs.wait_full_scans(1, timeout=max(1.0, deadline - time.monotonic()))
        c = sysfs.counters()
        line = (f"  full scan {scans - start_scans}: pages_shared {c['pages_shared']:,}, "
                f"pages_sharing {c['pages_sharing']:,} "
                f"({report.mib(c['pages_sharing'] * PAGE_SIZE)} saved)")
        out(line)
        if scans - start_scans >= 3 and c["pages_sharing"] == last:
            return
        last = c["pages_sharing"]
        if time.monotonic() > deadline:
            out("  (timeout: showing what has merged so far)")
            return
