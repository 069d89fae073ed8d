"""How to boot the test guest: kernel command line, libvirt domain XML, QEMU argv.

Guests always run under TCG (libvirt domain type ``qemu``, ``-accel tcg``):
on the hosts vmshare is developed on, /dev/kvm opens but KVM guests hang.
"""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from vmshare.errors import AccessDenied, DeadlineExceeded, HypervisorError, UsageError
from vmshare.guest.builder import GuestImage
from vmshare.ksm.procfs import ProcFs

READY_PREFIX = "vmshare-fill: ready"
QEMU_BINARY = "qemu-system-x86_64"
# Kernel messages that mean the guest will never print the ready line.
_FATAL = re.compile(r"Kernel panic|vmshare-fill: error[^\n]*|Attempted to kill init")
_READY = re.compile(r"^vmshare-fill: ready identical=\d+ unique=\d+ zero=\d+ volatile=\d+\s*$",
                    re.MULTILINE)
# quiet: few console lines; init_on_free=1: memory the guest kernel frees (the
# compressed initramfs, init sections) is zeroed, so it does not look like
# content two guests share; no_timer_check: under TCG on a loaded host the
# kernel's IO-APIC timer check can fail and panic the guest at boot.
BASE_CMDLINE = "console=ttyS0 quiet panic=0 init_on_free=1 no_timer_check"


class GuestBootTimeout(DeadlineExceeded):
    """The guest did not print its ready line within the deadline."""


class GuestBootFailed(HypervisorError):
    """The guest cannot become ready: kernel panic, fill error, or QEMU exited."""


@dataclass(frozen=True)
class FillSpec:
    """What the guest's fill program writes, in MiB per region, and the identical seed."""

    identical_mib: int = 0
    unique_mib: int = 0
    zero_mib: int = 0
    volatile_mib: int = 0
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("identical_mib", "unique_mib", "zero_mib", "volatile_mib"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"FillSpec.{name} must be an integer >= 0, not {value!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise UsageError(f"FillSpec.seed must be an integer in 0..2**64-1, not {self.seed!r}")

    @property
    def total_mib(self) -> int:
        return self.identical_mib + self.unique_mib + self.zero_mib + self.volatile_mib


def kernel_cmdline(spec: FillSpec) -> str:
    """The guest kernel command line: serial console, quiet, and the fill parameters."""
    return (f"{BASE_CMDLINE} vmshare.identical={spec.identical_mib} "
            f"vmshare.unique={spec.unique_mib} vmshare.zero={spec.zero_mib} "
            f"vmshare.volatile={spec.volatile_mib} vmshare.seed={spec.seed}")


def _check_room(spec: FillSpec, memory_mib: int) -> None:
    # The kernel, the unpacked initramfs and page tables need ~60 MiB of headroom.
    if memory_mib < 64 or spec.total_mib > memory_mib - 64:
        raise UsageError(f"a {memory_mib} MiB guest cannot hold {spec.total_mib} MiB of fill "
                         "(leave at least 64 MiB for the guest kernel)")


def _sub(parent: ET.Element, tag: str, text: str | int | None = None,
         **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = str(text)
    return element


def domain_xml(name: str, image: GuestImage, spec: FillSpec, *, memory_mib: int = 256,
               console_log: Path, vcpus: int = 1, nosharepages: bool = False,
               hotplug_slots: int = 0, max_memory_mib: int | None = None,
               metadata_xml: str | None = None, memory_source: str | None = None,
               memory_access: str | None = None) -> str:
    """libvirt XML for a TCG guest booting ``image`` directly, serial console to a file.

    No disk, no network, no balloon. ``hotplug_slots > 0`` adds ``<maxMemory>``
    (default: ``memory_mib + 256 * hotplug_slots``), one NUMA cell and ACPI so a
    DIMM can be attached live. ``metadata_xml`` is one namespaced element put in
    ``<metadata>``. ``memory_source`` ("anonymous", "file", "memfd") and
    ``memory_access`` ("private", "shared") set ``<memoryBacking>``'s source
    and access mode (libvirt then backs RAM with memory-backend-file or -memfd,
    share=on or off). Raises UsageError for impossible sizes, bad metadata XML
    or an unknown source or access mode.
    """
    _check_domain_args(name, vcpus, hotplug_slots, memory_source, memory_access)
    _check_room(spec, memory_mib)
    domain = ET.Element("domain", type="qemu")
    _sub(domain, "name", name)
    if metadata_xml is not None:
        _sub(domain, "metadata").append(_metadata_element(metadata_xml))
    _add_memory(domain, memory_mib, hotplug_slots, max_memory_mib)
    _add_memory_backing(domain, nosharepages, memory_source, memory_access)
    _add_boot(domain, image, spec, vcpus)
    if hotplug_slots > 0:   # a DIMM plugs into a NUMA cell
        numa = _sub(_sub(domain, "cpu"), "numa")
        _sub(numa, "cell", id="0", cpus=f"0-{vcpus - 1}", memory=str(memory_mib), unit="MiB")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    _add_devices(domain, console_log)
    # The image cache is root-only (0700); run this test guest's QEMU as root
    # rather than loosening the cache's permissions.
    seclabel = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
    _sub(seclabel, "label", "+0:+0")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def _check_domain_args(name: str, vcpus: int, hotplug_slots: int, memory_source: str | None,
                       memory_access: str | None) -> None:
    if not name:
        raise UsageError("the domain name must not be empty")
    if vcpus < 1:
        raise UsageError(f"vcpus must be >= 1, not {vcpus}")
    if hotplug_slots < 0:
        raise UsageError(f"hotplug_slots must be >= 0, not {hotplug_slots}")
    if memory_source not in (None, "anonymous", "file", "memfd"):
        raise UsageError(f"memory_source must be anonymous, file or memfd, not {memory_source!r}")
    if memory_access not in (None, "private", "shared"):
        raise UsageError(f"memory_access must be private or shared, not {memory_access!r}")


def _metadata_element(metadata_xml: str) -> ET.Element:
    try:
        return ET.fromstring(metadata_xml)
    except ET.ParseError as exc:
        raise UsageError(f"metadata_xml is not well-formed XML: {exc}") from exc


def _add_memory(domain: ET.Element, memory_mib: int, hotplug_slots: int,
                max_memory_mib: int | None) -> None:
    """<maxMemory> (room for hotplugged DIMMs), <memory> and <currentMemory>."""
    if hotplug_slots > 0:
        max_mib = max_memory_mib if max_memory_mib is not None else (
            memory_mib + 256 * hotplug_slots)
        if max_mib < memory_mib:
            raise UsageError(f"max_memory_mib {max_mib} is below memory_mib {memory_mib}")
        _sub(domain, "maxMemory", max_mib, slots=str(hotplug_slots), unit="MiB")
    _sub(domain, "memory", memory_mib, unit="MiB")
    _sub(domain, "currentMemory", memory_mib, unit="MiB")


def _add_memory_backing(domain: ET.Element, nosharepages: bool, memory_source: str | None,
                        memory_access: str | None) -> None:
    """<memoryBacking>, only when something in it differs from libvirt's default."""
    if not (nosharepages or memory_source or memory_access):
        return
    backing = _sub(domain, "memoryBacking")
    if nosharepages:
        _sub(backing, "nosharepages")
    if memory_source:
        _sub(backing, "source", type=memory_source)
    if memory_access:
        _sub(backing, "access", mode=memory_access)


def _add_boot(domain: ET.Element, image: GuestImage, spec: FillSpec, vcpus: int) -> None:
    """The vCPUs and a direct kernel boot (no firmware disk) with the fill parameters."""
    _sub(domain, "vcpu", vcpus, placement="static")
    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_el, "kernel", str(image.kernel))
    _sub(os_el, "initrd", str(image.initrd))
    _sub(os_el, "cmdline", kernel_cmdline(spec))
    _sub(_sub(domain, "features"), "acpi")


def _add_devices(domain: ET.Element, console_log: Path) -> None:
    """A serial console into ``console_log``, and nothing else: no USB, no balloon."""
    devices = _sub(domain, "devices")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(console_log))
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="file")
    _sub(console, "source", path=str(console_log))
    _sub(console, "target", type="serial", port="0")
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")


def _no_comma(what: str, path: Path) -> str:
    text = str(path)
    if "," in text:
        raise UsageError(f"{what} path {text!r} contains a comma, which QEMU options cannot take")
    return text


def qemu_argv(image: GuestImage, spec: FillSpec, *, memory_mib: int = 256, qmp_socket: Path,
              console_log: Path, name: str = "vmshare-guest",
              incoming: str | None = None) -> list[str]:
    """argv for a plain QEMU (no libvirt) TCG guest with a QMP socket and a console file.

    ``incoming`` (e.g. ``unix:/path``) starts it as a migration destination.
    Raises UsageError for paths QEMU's option syntax cannot express.
    """
    _check_room(spec, memory_mib)
    argv = [
        QEMU_BINARY, "-name", name.replace(",", ",,"),
        "-accel", "tcg", "-machine", "pc", "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", _no_comma("kernel", image.kernel),
        "-initrd", _no_comma("initrd", image.initrd),
        "-append", kernel_cmdline(spec),
        "-serial", f"file:{_no_comma('console log', console_log)}",
        "-qmp", f"unix:{_no_comma('QMP socket', qmp_socket)},server=on,wait=off",
    ]
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie has exited; it only waits for its parent to reap it
        return ProcFs().alive(pid)
    except AccessDenied:
        return True


def wait_ready(console_log: Path, timeout: float = 120.0, *, pid: int | None = None,
               poll: float = 0.1) -> str:
    """Wait for the guest's ``vmshare-fill: ready ...`` line in ``console_log``; return it.

    With ``pid`` (the QEMU process), fail at once when it exits. Raises
    GuestBootFailed on a kernel panic, a fill error or a dead QEMU, and
    GuestBootTimeout after ``timeout`` seconds; both carry the log's tail.
    """
    return wait_console(console_log, _READY, _FATAL, timeout=timeout, pid=pid,
                        poll=poll).group(0).strip()


def wait_console(console_log: Path, ready: re.Pattern[str], fatal: re.Pattern[str], *,
                 timeout: float, pid: int | None = None, poll: float = 0.1,
                 what: str = "guest") -> re.Match[str]:
    """Poll a serial console file until ``ready`` matches; return the match.

    Raises GuestBootFailed when ``fatal`` matches, the log cannot be read, or
    QEMU ``pid`` exits first; GuestBootTimeout after ``timeout`` seconds. Both
    carry the console's last lines.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = console_log.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise GuestBootFailed(f"cannot read console log {console_log}: {exc}") from exc
        found = ready.search(text)
        if found:
            return found
        failed = fatal.search(text)
        if failed:
            raise GuestBootFailed(f"{what} failed ({failed.group(0).strip()}); console "
                                  f"{console_log} ends with:\n{_tail(text)}")
        if pid is not None and not _alive(pid):
            raise GuestBootFailed(f"QEMU (pid {pid}) exited before the {what} was ready; "
                                  f"console {console_log} ends with:\n{_tail(text)}")
        if time.monotonic() >= deadline:
            raise GuestBootTimeout(f"{what} not ready after {timeout:.0f} s; console "
                                   f"{console_log} ends with:\n{_tail(text) or '(empty)'}")
        time.sleep(poll)
