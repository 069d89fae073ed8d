"""A real Debian 12 guest, made from Debian's own packages.

The busybox guest (``builder``) writes content the project chose; operators run
distributions. This guest is what they run, small: ``mmdebstrap`` builds a
minbase Debian 12 root from the mirror the host's apt uses, with systemd,
udev, journald, dbus, cron and rsyslog (ordinary services with heaps of their
own), and ``mkfs.ext4 -d`` turns it into a raw root disk without a loop mount.
Guests share that disk read-only through their own qcow2 overlays and boot the
host's Debian cloud kernel and initramfs (``root=/dev/vda``, virtio disk) under
libvirt TCG. A oneshot unit ordered after multi-user.target prints
``vmshare-guest: ready`` on the serial console, which ``wait_debian_ready``
waits for.

Guests of different content: ``vmshare.fill=SEED:MIB`` on the kernel command
line (``debian_domain_xml(fill=GuestFill(...))``) makes a oneshot unit, before
the ready line, write MIB MiB of pages derived from SEED into a file on a
tmpfs of its own (page i is SHA-256 of ``SEED:i`` repeated, made by the
image's perl): guests of one seed hold the same pages, of two seeds none in
common, and a smaller MIB holds the first pages of the larger one's. It
prints ``vmshare-guest: filled SEED:MIB`` when done.

Images live in a cache keyed by every input (suite, mirror, packages, the
customisation below and its version, the kernel): a cached image is reused
only when the same inputs would build it again.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from vmshare.errors import ImageBuildError, UsageError
from vmshare.guest.builder import find_kernel
from vmshare.guest.launch import wait_console
from vmshare.guest.retention import KEY_HEX_LENGTH, use_entry
from vmshare.guest.staging import prepare_cache, staged

SUITE = "bookworm"
# perl (Digest::SHA) writes the fill pages
PACKAGES = ("systemd-sysv", "udev", "dbus", "cron", "rsyslog", "procps", "perl")
DEFAULT_CACHE_DIR = Path("/var/cache/vmshare/debian")
ROOT_SIZE_MIB = 1024
READY_TEXT = "vmshare-guest: ready"
# not anchored: the serial getty's login prompt may precede it on the same line
READY = re.compile(r"vmshare-guest: ready uptime=([0-9.]+)")
FATAL = re.compile(r"Kernel panic[^\n]*|Give root password for maintenance|"
                   r"You are in emergency mode|Failed to mount /sysroot")
# Bump when the customisation changes (the key covers everything else).
LAYOUT_VERSION = "2"
BUILD_TIMEOUT_S = 900.0
# no_timer_check: a TCG vCPU starved by a loaded host fails the IO-APIC timer
# check and panics ("IO-APIC + timer doesn't work"; seen here at load 4.5)
CMDLINE = "console=ttyS0 root=/dev/vda rw quiet panic=-1 no_timer_check"

FILLED_TEXT = "vmshare-guest: filled"
FILL_PATH = "/run/vmshare-fill/pages"

_READY_UNIT = f"""\
[Unit]
Description=Tell the host (serial console) that this vmshare test guest is up
After=multi-user.target vmshare-fill.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{READY_TEXT} uptime=$(cut -d" " -f1 /proc/uptime)" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""

# SEED and MIB are digits (checked here and by the host); page i of the file is
# SHA-256("SEED:i") repeated 128 times: distinct pages, the same for one seed.
_FILL_SCRIPT = f"""\
#!/bin/sh
set -eu
arg=$(tr ' ' '\\n' < /proc/cmdline | sed -n 's/^vmshare[.]fill=//p' | tail -n 1)
seed=${{arg%%:*}}
mib=${{arg#*:}}
case "$seed:$mib" in
  *[!0-9:]*|:*|*:|*:*:*) echo "vmshare-guest: fill refused: $arg" > /dev/ttyS0; exit 1 ;;
esac
dir=$(dirname {FILL_PATH})
mkdir -p "$dir"
mount -t tmpfs -o size=$((mib + 1))m,mode=0700 vmshare-fill "$dir"
perl -MDigest::SHA=sha256 -e 'my ($s, $n) = @ARGV; binmode STDOUT;
  print sha256("$s:$_") x 128 for 0 .. $n * 256 - 1' "$seed" "$mib" > {FILL_PATH}
echo "{FILLED_TEXT} $seed:$mib" > /dev/ttyS0
"""

_FILL_UNIT = """\
[Unit]
Description=Fill a tmpfs file with the pages vmshare.fill=SEED:MIB names (test content)
ConditionKernelCommandLine=vmshare.fill
After=local-fs.target
Before=vmshare-ready.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh /usr/local/lib/vmshare-fill

[Install]
WantedBy=multi-user.target
"""

# path inside the root -> content; written after mmdebstrap, before mkfs.
_FILES = {
    "etc/hostname": "vmshare-guest\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 vmshare-guest\n",
    "etc/fstab": "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n",
    "etc/systemd/system/vmshare-ready.service": _READY_UNIT,
    "etc/systemd/system/vmshare-fill.service": _FILL_UNIT,
    "usr/local/lib/vmshare-fill": _FILL_SCRIPT,
}
_LINKS = {
    "etc/systemd/system/multi-user.target.wants/vmshare-ready.service":
        "/etc/systemd/system/vmshare-ready.service",
    "etc/systemd/system/multi-user.target.wants/vmshare-fill.service":
        "/etc/systemd/system/vmshare-fill.service",
}


@dataclass(frozen=True)
class GuestFill:
    """``mib`` MiB of pages derived from ``seed``, written by the guest at boot."""

    seed: int
    mib: int

    @property
    def argument(self) -> str:
        """The kernel command-line parameter that asks for it."""
        return f"vmshare.fill={self.seed}:{self.mib}"

    @property
    def marker(self) -> str:
        """The console line the guest prints when the file is written."""
        return f"{FILLED_TEXT} {self.seed}:{self.mib}"


@dataclass(frozen=True)
class DebianImage:
    """A Debian root disk (raw ext4, shared read-only) and the kernel that boots it."""

    root: Path
    kernel: Path
    initrd: Path


def find_initrd(kernel: Path) -> Path:
    """The initramfs Debian made for ``kernel`` (``initrd.img-<version>``).

    Raises ImageBuildError when it is missing.
    """
    version = kernel.name.removeprefix("vmlinuz-")
    initrd = kernel.with_name(f"initrd.img-{version}")
    if not initrd.is_file():
        raise ImageBuildError(f"no initramfs {initrd} for {kernel}: reinstall "
                              "linux-image-cloud-amd64 (it builds one)")
    return initrd


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host's apt is configured with (deb822 or one-line
    sources), so the guest comes from where the host's packages come from.

    Raises ImageBuildError when no Debian mirror is configured.
    """
    candidates = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d")
                                                        .glob("*.sources")),
                  *sorted((sources_dir / "sources.list.d").glob("*.list"))]
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            match = (re.match(r"^URIs:\s*(\S+)", line)
                     or re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line))
            if match and "security" not in match.group(1) \
                    and match.group(1).rstrip("/").endswith("/debian"):
                return match.group(1)
    raise ImageBuildError(f"no Debian mirror found in {sources_dir}/sources.list(.d)")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageBuildError(f"{name} not found: install {package} "
                              "(integration/setup.sh does)")
    return path


def _run(argv: list[str], what: str, timeout: float = BUILD_TIMEOUT_S) -> None:
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{what} did not finish within {timeout:.0f} s") from exc
    if result.returncode != 0:
        tail = "\n".join(result.stderr.decode(errors="replace").splitlines()[-15:])
        raise ImageBuildError(f"{what} failed (exit {result.returncode}):\n{tail}")


def image_key(mirror: str, kernel: Path) -> str:
    """The cache key: every input that changes what would be built."""
    parts = [LAYOUT_VERSION, SUITE, mirror, " ".join(PACKAGES), str(ROOT_SIZE_MIB),
             kernel.name, *(f"{k}={v}" for k, v in sorted(_FILES.items())),
             *(f"{k}->{v}" for k, v in sorted(_LINKS.items()))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:KEY_HEX_LENGTH]


def _customise(root: Path) -> None:
    for rel, content in _FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    for rel, target in _LINKS.items():
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    # Each guest makes its own machine-id on first boot (its overlay is writable).
    (root / "etc/machine-id").write_text("")


def build_debian_image(cache_dir: Path = DEFAULT_CACHE_DIR, *,
                       boot_dir: Path = Path("/boot"), mirror: str | None = None,
                       retention_s: float | None = None) -> DebianImage:
    """Build (or reuse from ``cache_dir``) the Debian root disk.

    Idempotent and safe against a concurrent builder: the disk is made in a
    staging directory inside ``cache_dir`` and renamed into place. Then the
    use is recorded and older images pruned (``retention.use_entry``;
    ``retention_s`` None: the environment's retention or 14 days). Raises
    ImageBuildError when mmdebstrap, mkfs.ext4, the kernel or its initramfs is
    missing, the mirror cannot be reached, or the cache cannot be written.
    """
    kernel = find_kernel(boot_dir)
    initrd = find_initrd(kernel)
    mirror = mirror or apt_mirror()
    final = cache_dir / image_key(mirror, kernel)
    image = DebianImage(root=final / "root.img", kernel=kernel, initrd=initrd)
    if not image.root.is_file():
        _build_root(cache_dir, final, image.root, mirror)
    use_entry(final, retention_s)
    return image


def _build_root(cache_dir: Path, final: Path, root: Path, mirror: str) -> None:
    """Make the root disk ``root`` in the cache entry ``final``. Raises ImageBuildError."""
    mmdebstrap = _tool("mmdebstrap", "mmdebstrap")
    mkfs = _tool("mkfs.ext4", "e2fsprogs")
    prepare_cache(cache_dir)
    with staged(cache_dir, final, ".build-", root.is_file, "the Debian image") as staging:
        tree = staging / "tree"
        _run([mmdebstrap, "--variant=minbase", "--mode=root", "--quiet",
              f"--include={','.join(PACKAGES)}", SUITE, str(tree), mirror],
             f"mmdebstrap {SUITE} from {mirror}")
        _customise(tree)
        _run([mkfs, "-q", "-F", "-L", "vmshare-root", "-d", str(tree),
              str(staging / "root.img"), f"{ROOT_SIZE_MIB}M"], "mkfs.ext4 -d")
        shutil.rmtree(tree)


def make_overlay(image: DebianImage, path: Path) -> Path:
    """A qcow2 overlay of the shared root disk for one guest (its writes go here).

    Raises ImageBuildError when qemu-img fails, UsageError for a path QEMU
    cannot take.
    """
    if "," in str(path) or "," in str(image.root):
        raise UsageError(f"overlay path {path} contains a comma, which QEMU cannot take")
    qemu_img = _tool("qemu-img", "qemu-utils")
    path.unlink(missing_ok=True)
    _run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(image.root), "-F", "raw",
          str(path)], f"qemu-img create {path}", timeout=60.0)
    return path


def _sub(parent: ET.Element, tag: str, text: str | int | None = None,
         **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = str(text)
    return element


def debian_domain_xml(name: str, image: DebianImage, overlay: Path, *, console_log: Path,
                      memory_mib: int = 512, vcpus: int = 1, video: bool = False,
                      metadata_xml: str | None = None, nosharepages: bool = False,
                      fill: GuestFill | None = None) -> str:
    """libvirt XML for a TCG Debian guest on ``overlay``, serial console to a file.

    ``video`` adds a VGA device (its VRAM and ROM are QEMU RAM blocks too);
    ``fill`` asks the guest to write those pages at boot (at most half its RAM).
    Raises UsageError for an empty name, too little memory, a bad fill or bad
    metadata XML.
    """
    if not name:
        raise UsageError("the domain name must not be empty")
    if memory_mib < 256:
        raise UsageError(f"a Debian guest needs at least 256 MiB, not {memory_mib}")
    if fill is not None and (fill.seed < 0 or not 0 < fill.mib <= memory_mib // 2):
        raise UsageError(f"fill {fill.seed}:{fill.mib}: the seed must be 0 or more and "
                         f"the size 1 to {memory_mib // 2} MiB (half the guest's RAM)")
    domain = ET.Element("domain", type="qemu")
    _sub(domain, "name", name)
    if metadata_xml is not None:
        try:
            _sub(domain, "metadata").append(ET.fromstring(metadata_xml))
        except ET.ParseError as exc:
            raise UsageError(f"metadata_xml is not well-formed XML: {exc}") from exc
    _sub(domain, "memory", memory_mib, unit="MiB")
    _sub(domain, "currentMemory", memory_mib, unit="MiB")
    if nosharepages:
        _sub(_sub(domain, "memoryBacking"), "nosharepages")
    _sub(domain, "vcpu", vcpus, placement="static")
    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_el, "kernel", str(image.kernel))
    _sub(os_el, "initrd", str(image.initrd))
    _sub(os_el, "cmdline", CMDLINE if fill is None else f"{CMDLINE} {fill.argument}")
    _sub(_sub(domain, "features"), "acpi")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    devices = _sub(domain, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2")
    _sub(disk, "source", file=str(overlay))
    _sub(disk, "target", dev="vda", bus="virtio")
    for tag in ("serial", "console"):
        el = _sub(devices, tag, type="file")
        _sub(el, "source", path=str(console_log))
        _sub(el, "target", port="0", **({"type": "serial"} if tag == "console" else {}))
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    if video:
        _sub(_sub(devices, "video"), "model", type="vga")
    # The image cache is root-only (0700): run this test guest's QEMU as root.
    seclabel = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
    _sub(seclabel, "label", "+0:+0")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def wait_debian_ready(console_log: Path, timeout: float = 180.0, *, pid: int | None = None,
                      poll: float = 0.25) -> float:
    """Wait for the guest's ready line; return the guest's uptime it reported.

    With ``pid`` (its QEMU), fail as soon as QEMU is gone. Raises
    GuestBootFailed (kernel panic, emergency mode, QEMU gone) or
    GuestBootTimeout, each with the console's last lines.
    """
    found = wait_console(console_log, READY, FATAL, timeout=timeout, pid=pid, poll=poll,
                         what="Debian guest")
    return float(found.group(1))
