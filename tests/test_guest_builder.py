"""Fast tests of the guest image builder (no QEMU): cpio, image cache, XML, argv, readiness."""

from __future__ import annotations

import gzip
import shutil
import stat
import struct
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmshare.errors import DeadlineExceeded, ImageBuildError, UsageError
from vmshare.guest import (
    FillSpec,
    GuestBootFailed,
    GuestBootTimeout,
    GuestImage,
    build_image,
    domain_xml,
    find_kernel,
    kernel_cmdline,
    qemu_argv,
    wait_ready,
)
from vmshare.guest.builder import BUSYBOX_APPLETS, compile_fill, initramfs_entries
from vmshare.guest.cpio import HEADER_SIZE, CpioEntry, read_newc, write_newc
from vmshare.guest.pattern import expected_pages, mix64, page_key, page_region

IMAGE = GuestImage(kernel=Path("/cache/k/vmlinuz"), initrd=Path("/cache/k/initrd.img"))
SPEC = FillSpec(identical_mib=96, unique_mib=32, zero_mib=16, volatile_mib=4, seed=42)
GUEST_SRC = Path(__file__).resolve().parent.parent / "vmshare" / "guest"

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


def sample_entries() -> list[CpioEntry]:
    return [
        CpioEntry.directory("bin"),
        CpioEntry.file("bin/a", b"x"),                      # odd sizes exercise padding
        CpioEntry.file("bin/long-name-of-odd-len", b"hello world" * 99, 0o751),
        CpioEntry.file("empty", b""),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.char_device("console", 5, 1),
    ]


# --- cpio -------------------------------------------------------------------

def test_cpio_round_trip_with_own_reader() -> None:
    entries = sample_entries()
    archive = write_newc(entries)
    assert len(archive) % 4 == 0
    back = read_newc(archive)
    assert back == entries
    assert b"TRAILER!!!\0" in archive[-HEADER_SIZE - 16:]


def test_cpio_members_start_aligned_with_correct_sizes() -> None:
    archive = write_newc(sample_entries())
    offset, names = 0, []
    while True:
        assert offset % 4 == 0
        assert archive[offset:offset + 6] == b"070701"
        filesize = int(archive[offset + 54:offset + 62], 16)
        namesize = int(archive[offset + 94:offset + 102], 16)
        name = archive[offset + HEADER_SIZE:offset + HEADER_SIZE + namesize - 1].decode()
        names.append(name)
        data = offset + HEADER_SIZE + namesize
        data += -data % 4
        offset = data + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            break
    assert offset == len(archive)
    assert names[-1] == "TRAILER!!!" and names[:-1] == [e.name for e in sample_entries()]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio tool is not installed")
def test_cpio_tool_reads_our_archive(tmp_path: Path) -> None:
    entries = [e for e in sample_entries() if not stat.S_ISCHR(e.mode)]
    archive = write_newc(entries)
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=archive, capture_output=True,
                             check=True).stdout.decode().splitlines()
    assert [line.split()[8] for line in listing] == [e.name for e in entries]
    assert listing[2].startswith("-rwxr-x--x")
    assert listing[4].startswith("lrwxrwxrwx") and listing[4].endswith("bin/sh -> busybox")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive,
                   cwd=out, check=True)
    assert (out / "bin/long-name-of-odd-len").read_bytes() == b"hello world" * 99
    assert stat.S_IMODE((out / "bin/long-name-of-odd-len").stat().st_mode) == 0o751
    assert (out / "empty").read_bytes() == b""
    assert (out / "bin/sh").readlink() == Path("busybox")


@pytest.mark.parametrize("entries", [
    [CpioEntry.file("a", b"1"), CpioEntry.file("a", b"2")],
    [CpioEntry.file("", b"1")],
    [CpioEntry.file("a\0b", b"1")],
    [CpioEntry("dir", stat.S_IFDIR | 0o755, b"data")],
])
def test_cpio_writer_rejects_bad_members(entries: list[CpioEntry]) -> None:
    with pytest.raises(ImageBuildError):
        write_newc(entries)


def test_cpio_reader_rejects_damage() -> None:
    archive = write_newc(sample_entries())
    with pytest.raises(ImageBuildError, match=r"truncated|past the end"):
        read_newc(archive[:-HEADER_SIZE])          # no trailer
    with pytest.raises(ImageBuildError, match="magic"):
        read_newc(b"070707" + archive[6:])
    with pytest.raises(ImageBuildError, match="past the end"):
        read_newc(archive[:116 + HEADER_SIZE + 3])   # second member cut in its name


def test_initramfs_layout() -> None:
    entries = {e.name: e for e in initramfs_entries(b"BB", b"#!/bin/sh\n", b"FILL")}
    assert entries["init"].mode == stat.S_IFREG | 0o755 and entries["init"].data == b"#!/bin/sh\n"
    assert entries["bin/fill"].mode == stat.S_IFREG | 0o755
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    for applet in ("sh", "mount", "cat", "sleep", "poweroff"):
        assert applet in BUSYBOX_APPLETS
        assert entries[f"bin/{applet}"].data == b"busybox"
    names = list(entries)
    assert names.index("bin") < names.index("bin/busybox")


# --- the fill pattern ---------------------------------------------------------

def test_pattern_numpy_matches_scalar_reference() -> None:
    for region, seed, index in (("I", 1, 0), ("U", 2**64 - 1, 77), ("V", 0, 5)):
        page = expected_pages(region, seed, index, 1)[0].tobytes()
        words = struct.unpack("<512Q", page)
        key = page_key(region, seed, index)
        assert words[1:4] == (index, seed, 0)
        assert words[4:] == tuple(mix64(key + j * 0x9E3779B97F4A7C15) for j in range(4, 512))
        assert page_region(page) == region
    assert page_region(bytes(4096)) is None


def test_pattern_pages_are_distinct_within_and_across_regions() -> None:
    pages = {p.tobytes() for r in "IUV" for p in expected_pages(r, 9, 0, 512)}
    assert len(pages) == 3 * 512
    assert expected_pages("I", 9, 3, 1).tobytes() != expected_pages("I", 10, 3, 1).tobytes()


@needs_gcc
def test_fill_binary_writes_the_pattern(tmp_path: Path) -> None:
    fill = tmp_path / "fill"
    compile_fill((GUEST_SRC / "fill.c").read_bytes(), fill)
    for region, seed, index in (("I", 7, 0), ("I", 7, 24575), ("U", 123456789, 3), ("V", 1, 1)):
        out = subprocess.run([str(fill), "-p", region, str(seed), str(index)],
                             capture_output=True, check=True).stdout
        assert out == expected_pages(region, seed, index, 1).tobytes()
    bad = subprocess.run([str(fill), "1", "0", "0", "0", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "vmshare-fill: error bad seed 'x'" in bad.stdout


def test_compile_errors_become_image_build_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="not found"):
        compile_fill(b"int main(void){return 0;}", tmp_path / "f", cc="/nonexistent/cc")
    if shutil.which("gcc"):
        with pytest.raises(ImageBuildError, match=r"compiling fill\.c failed"):
            compile_fill(b"this is not C", tmp_path / "f")


# --- build_image --------------------------------------------------------------

def fake_elf(interp: bool = False) -> bytes:
    """A minimal ELF64 header with zero or one (PT_INTERP) program header."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 32, 64)                    # e_phoff
    struct.pack_into("<HH", header, 54, 56, 1 if interp else 0)
    return bytes(header) + (struct.pack("<I", 3) + bytes(52) if interp else b"")


@pytest.fixture
def fake_inputs(tmp_path: Path) -> tuple[Path, Path]:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-9-cloud-amd64").write_bytes(b"old kernel")
    (boot / "vmlinuz-6.1.0-10-cloud-amd64").write_bytes(b"new kernel")
    (boot / "vmlinuz-6.1.0-11-amd64").write_bytes(b"not a cloud kernel")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(fake_elf())
    return boot, busybox


def test_find_kernel_picks_newest_cloud_kernel(fake_inputs: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    boot, _ = fake_inputs
    assert find_kernel(boot).name == "vmlinuz-6.1.0-10-cloud-amd64"
    with pytest.raises(ImageBuildError, match="linux-image-cloud-amd64"):
        find_kernel(tmp_path / "nothing")


@needs_gcc
def test_build_image_is_cached_and_content_addressed(fake_inputs: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    boot, busybox = fake_inputs
    cache = tmp_path / "cache"
    image = build_image(cache, boot_dir=boot, busybox=busybox)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert image.kernel.read_bytes() == b"new kernel"
    members = {e.name: e for e in read_newc(gzip.decompress(image.initrd.read_bytes()))}
    assert members["init"].data == (GUEST_SRC / "init.sh").read_bytes()
    assert members["bin/busybox"].data == fake_elf()
    assert members["bin/fill"].data[:4] == b"\x7fELF"
    assert [p.name for p in cache.iterdir()] == [image.kernel.parent.name]   # no temp left

    mtime = image.initrd.stat().st_mtime_ns
    assert build_image(cache, boot_dir=boot, busybox=busybox) == image
    assert image.initrd.stat().st_mtime_ns == mtime                          # not rebuilt

    (boot / "vmlinuz-6.1.0-10-cloud-amd64").write_bytes(b"patched kernel")
    rebuilt = build_image(cache, boot_dir=boot, busybox=busybox)
    assert rebuilt.kernel.parent != image.kernel.parent
    assert rebuilt.kernel.read_bytes() == b"patched kernel"


def test_build_image_refuses_dynamic_busybox(fake_inputs: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    boot, busybox = fake_inputs
    busybox.write_bytes(fake_elf(interp=True))
    with pytest.raises(ImageBuildError, match="dynamically linked"):
        build_image(tmp_path / "cache", boot_dir=boot, busybox=busybox)
    busybox.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(ImageBuildError, match="not a 64-bit"):
        build_image(tmp_path / "cache", boot_dir=boot, busybox=busybox)


# --- cmdline, XML, argv ---------------------------------------------------------

def test_kernel_cmdline() -> None:
    words = kernel_cmdline(SPEC).split()
    assert "console=ttyS0" in words and "quiet" in words
    for word in ("vmshare.identical=96", "vmshare.unique=32", "vmshare.zero=16",
                 "vmshare.volatile=4", "vmshare.seed=42"):
        assert word in words


@pytest.mark.parametrize("kwargs", [{"identical_mib": -1}, {"seed": -1}, {"seed": 2**64},
                                    {"zero_mib": True}])
def test_fill_spec_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        FillSpec(**kwargs)


def test_domain_xml_plain() -> None:
    root = ET.fromstring(domain_xml("g1", IMAGE, SPEC, console_log=Path("/tmp/c.log")))
    assert root.tag == "domain" and root.get("type") == "qemu"
    memory = root.find("memory")
    assert memory is not None and memory.text == "256" and memory.get("unit") == "MiB"
    assert root.findtext("os/kernel") == str(IMAGE.kernel)
    assert root.findtext("os/initrd") == str(IMAGE.initrd)
    assert root.findtext("os/cmdline") == kernel_cmdline(SPEC)
    assert root.findtext("on_crash") == "destroy"
    serial = root.find("devices/serial/source")
    assert serial is not None and serial.get("path") == "/tmp/c.log"
    assert root.find("devices/disk") is None and root.find("devices/interface") is None
    assert root.find("maxMemory") is None and root.find("cpu/numa") is None
    assert root.find("memoryBacking") is None


def test_domain_xml_hotplug_nosharepages_metadata() -> None:
    xml = domain_xml("g2", IMAGE, SPEC, memory_mib=512, console_log=Path("/tmp/c.log"),
                     vcpus=2, nosharepages=True, hotplug_slots=4, max_memory_mib=2048,
                     metadata_xml='<v:policy xmlns:v="urn:vmshare">trust=a</v:policy>')
    root = ET.fromstring(xml)
    max_memory = root.find("maxMemory")
    assert max_memory is not None and max_memory.get("slots") == "4"
    assert max_memory.text == "2048"
    cells = root.findall("cpu/numa/cell")
    assert len(cells) == 1 and cells[0].get("memory") == "512" and cells[0].get("cpus") == "0-1"
    assert root.find("features/acpi") is not None
    assert root.find("memoryBacking/nosharepages") is not None
    assert root.findtext("metadata/{urn:vmshare}policy") == "trust=a"
    assert root.findtext("vcpu") == "2"


def test_domain_xml_escapes_name_and_rejects_bad_input() -> None:
    name = "a<b>&'\"c"
    xml = domain_xml(name, IMAGE, SPEC, console_log=Path("/tmp/c.log"))
    assert "<b>" not in xml
    assert ET.fromstring(xml).findtext("name") == name
    with pytest.raises(UsageError):
        domain_xml("g", IMAGE, SPEC, console_log=Path("/c"), metadata_xml="<unclosed>")
    with pytest.raises(UsageError):
        domain_xml("g", IMAGE, FillSpec(identical_mib=250), console_log=Path("/c"))
    with pytest.raises(UsageError):
        domain_xml("g", IMAGE, SPEC, console_log=Path("/c"), hotplug_slots=1,
                   max_memory_mib=128)


def test_qemu_argv() -> None:
    argv = qemu_argv(IMAGE, SPEC, memory_mib=320, qmp_socket=Path("/run/x/q.sock"),
                     console_log=Path("/tmp/c.log"), name="vm,1", incoming="unix:/tmp/m")
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-accel tcg" in joined and "-machine pc" in joined and "-m 320" in joined
    assert "-nodefaults" in argv and "-display none" in joined and "-enable-kvm" not in argv
    assert argv[argv.index("-append") + 1] == kernel_cmdline(SPEC)
    assert argv[argv.index("-serial") + 1] == "file:/tmp/c.log"
    assert argv[argv.index("-qmp") + 1] == "unix:/run/x/q.sock,server=on,wait=off"
    assert argv[argv.index("-name") + 1] == "vm,,1"
    assert argv[-2:] == ["-incoming", "unix:/tmp/m"]
    assert "-incoming" not in qemu_argv(IMAGE, SPEC, qmp_socket=Path("/q"),
                                        console_log=Path("/c"))
    with pytest.raises(UsageError, match="comma"):
        qemu_argv(IMAGE, SPEC, qmp_socket=Path("/a,b"), console_log=Path("/c"))


# --- wait_ready -------------------------------------------------------------------

READY = "vmshare-fill: ready identical=96 unique=32 zero=16 volatile=4"


def test_wait_ready_returns_the_line_when_it_appears(tmp_path: Path) -> None:
    log = tmp_path / "console"

    def boot() -> None:
        time.sleep(0.3)
        log.write_text("[    0.1] booting\n" + READY + "\n")

    writer = threading.Thread(target=boot)
    writer.start()
    try:
        assert wait_ready(log, timeout=10, poll=0.02) == READY
    finally:
        writer.join()


def test_wait_ready_fails_on_panic_and_timeout(tmp_path: Path) -> None:
    log = tmp_path / "console"
    log.write_text("line one\nKernel panic - not syncing: VFS: Unable to mount root fs\n")
    started = time.monotonic()
    with pytest.raises(GuestBootFailed, match="Kernel panic"):
        wait_ready(log, timeout=10)
    assert time.monotonic() - started < 1
    log.write_text("still booting\n")
    with pytest.raises(GuestBootTimeout, match="still booting") as info:
        wait_ready(log, timeout=0.3, poll=0.05)
    assert isinstance(info.value, DeadlineExceeded)
    with pytest.raises(GuestBootTimeout, match="empty"):
        wait_ready(tmp_path / "missing", timeout=0.1, poll=0.05)


def test_wait_ready_fails_fast_when_qemu_is_gone(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    log = tmp_path / "console"
    log.write_text("qemu said something\n")
    with pytest.raises(GuestBootFailed, match=f"pid {proc.pid}"):
        wait_ready(log, timeout=10, pid=proc.pid)
