"""Build the test/demo guest: the host's Debian cloud kernel plus a generated initramfs.

The initramfs (gzip-compressed newc cpio) holds busybox-static with a few
applet links, ``/init`` (init.sh) and ``/bin/fill`` compiled from fill.c with
``gcc -O2 -static``. Images live in a content-addressed cache: the key hashes
every input (fill.c, init.sh, the busybox binary, the kernel, the compiler's
version and this layout's version), so a cached image is reused only when it
would be rebuilt bit for bit the same.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vmshare.errors import ImageBuildError
from vmshare.guest.cpio import CpioEntry, write_newc
from vmshare.guest.retention import KEY_HEX_LENGTH, use_entry
from vmshare.guest.staging import prepare_cache, staged

DEFAULT_CACHE_DIR = Path("/var/cache/vmshare/guest")
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
BUSYBOX_APPLETS = ("sh", "mount", "cat", "echo", "sleep", "sync", "poweroff", "ls", "dmesg")
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
# Bump when the archive layout or build flags change without any input changing.
LAYOUT_VERSION = "1"
CFLAGS = ("-O2", "-static", "-s", "-Wall", "-Wextra", "-Werror")
_PT_INTERP = 3


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: a kernel and its initramfs, both in the image cache."""

    kernel: Path
    initrd: Path


def find_kernel(boot_dir: Path = Path("/boot")) -> Path:
    """The newest ``vmlinuz-*-cloud-amd64`` in ``boot_dir``.

    Raises ImageBuildError when there is none (install linux-image-cloud-amd64).
    """
    candidates = [p for p in boot_dir.glob("vmlinuz-*-cloud-amd64") if p.is_file()]
    if not candidates:
        raise ImageBuildError(
            f"no Debian cloud kernel (vmlinuz-*-cloud-amd64) in {boot_dir}: "
            "install linux-image-cloud-amd64 (integration/setup.sh does)")
    return max(candidates, key=lambda p: _version_key(p.name))


def _version_key(name: str) -> tuple[tuple[int, ...], str]:
    version = name.removeprefix("vmlinuz-").removesuffix("-cloud-amd64")
    return tuple(int(n) for n in re.findall(r"\d+", version)), version


def find_busybox(candidates: tuple[Path, ...] = BUSYBOX_CANDIDATES) -> Path:
    """A statically linked busybox. Raises ImageBuildError if none is found."""
    for path in candidates:
        if path.is_file():
            if not _is_static_elf(path):
                raise ImageBuildError(
                    f"{path} is dynamically linked; the guest needs busybox-static")
            return path
    raise ImageBuildError("busybox not found: install busybox-static (integration/setup.sh)")


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 little-endian executable without a PT_INTERP header."""
    with path.open("rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            raise ImageBuildError(f"{path} is not a 64-bit little-endian ELF file")
        phoff, = struct.unpack_from("<Q", ident, 32)
        phentsize, phnum = struct.unpack_from("<HH", ident, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    if phentsize < 4 or len(table) < phentsize * phnum:
        raise ImageBuildError(f"{path}: truncated ELF program headers")
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != _PT_INTERP
               for i in range(phnum))


def _guest_source(name: str) -> bytes:
    return resources.files("vmshare.guest").joinpath(name).read_bytes()


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True,
                              timeout=30, check=True)
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"C compiler {cc!r} not found: install gcc and libc6-dev "
            "(integration/setup.sh does)") from exc
    except (subprocess.SubprocessError, OSError) as exc:
        raise ImageBuildError(f"{cc} --version failed: {exc}") from exc
    return done.stdout.splitlines()[0] if done.stdout else ""


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def compile_fill(source: bytes, out: Path, cc: str = "gcc") -> None:
    """Compile fill.c into the static binary ``out``. Raises ImageBuildError."""
    with tempfile.TemporaryDirectory(prefix="vmshare-fill-") as tmp:
        src = Path(tmp, "fill.c")
        src.write_bytes(source)
        try:
            done = subprocess.run([cc, *CFLAGS, "-o", str(out), str(src)],
                                  capture_output=True, text=True, timeout=120)
        except FileNotFoundError as exc:
            raise ImageBuildError(f"C compiler {cc!r} not found: install gcc") from exc
        except subprocess.TimeoutExpired as exc:
            raise ImageBuildError(f"compiling fill.c with {cc} timed out") from exc
    if done.returncode != 0:
        hint = " (static libc missing? install libc6-dev)" if "-lc" in done.stderr else ""
        raise ImageBuildError(
            f"compiling fill.c failed{hint}: {done.stderr.strip()[-2000:]}")


def initramfs_entries(busybox: bytes, init_script: bytes, fill: bytes) -> list[CpioEntry]:
    """The members of the guest's initramfs, parents first."""
    entries = [CpioEntry.directory(d) for d in ("bin", "dev", "proc", "sys", "tmp", "root")]
    entries += [
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.char_device("dev/null", 1, 3, 0o666),
        CpioEntry.file("bin/busybox", busybox, 0o755),
        *(CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS),
        CpioEntry.file("bin/fill", fill, 0o755),
        CpioEntry.file("init", init_script, 0o755),
    ]
    return entries


def _atomic_write(directory: Path, name: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_image(cache_dir: Path = DEFAULT_CACHE_DIR, *, boot_dir: Path = Path("/boot"),
                busybox: Path | None = None, cc: str = "gcc",
                retention_s: float | None = None) -> GuestImage:
    """Build (or reuse from ``cache_dir``) the guest kernel and initramfs.

    Idempotent and safe against concurrent builders: each image is written to
    a temporary directory inside ``cache_dir`` and renamed into place, so a
    reader never sees half an image. ``cache_dir`` is created with mode 0700.
    Then the use is recorded and older images pruned (``retention.use_entry``;
    ``retention_s`` None: the environment's retention or 14 days).

    Raises ImageBuildError when the kernel, busybox-static or the compiler is
    missing, fill.c does not compile, or the cache cannot be written.
    """
    kernel = find_kernel(boot_dir)
    busybox_path = busybox if busybox is not None else find_busybox()
    if not _is_static_elf(busybox_path):
        raise ImageBuildError(f"{busybox_path} is dynamically linked; need busybox-static")
    fill_c = _guest_source("fill.c")
    init_sh = _guest_source("init.sh")
    key = hashlib.sha256("\n".join((
        LAYOUT_VERSION, " ".join(CFLAGS), _compiler_version(cc),
        hashlib.sha256(fill_c).hexdigest(), hashlib.sha256(init_sh).hexdigest(),
        _file_digest(busybox_path), _file_digest(kernel), kernel.name,
    )).encode()).hexdigest()[:KEY_HEX_LENGTH]

    prepare_cache(cache_dir)
    final = cache_dir / key
    image = GuestImage(kernel=final / KERNEL_NAME, initrd=final / INITRD_NAME)
    if not (image.kernel.is_file() and image.initrd.is_file()):
        # Another builder may win the race; its image is identical by construction.
        with staged(cache_dir, final, f".build-{key}-",
                    lambda: image.kernel.is_file() and image.initrd.is_file(),
                    "the guest image") as staging:
            fill_bin = staging / "fill"
            compile_fill(fill_c, fill_bin, cc)
            archive = write_newc(initramfs_entries(
                busybox_path.read_bytes(), init_sh, fill_bin.read_bytes()))
            fill_bin.unlink()
            _atomic_write(staging, INITRD_NAME,
                          gzip.compress(archive, compresslevel=6, mtime=0))
            _atomic_write(staging, KERNEL_NAME, kernel.read_bytes())
            os.chmod(staging, 0o755)
    use_entry(final, retention_s)
    return image
