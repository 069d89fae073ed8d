"""Page sources: dump readers against a generated corpus, and live process memory."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import dump_corpus as corpus
from vmshare.errors import DumpError, ProcessGone
from vmshare.model import PAGE_SIZE, Vma
from vmshare.sources import (
    ElfCoreSource,
    KdumpSource,
    LiveProcessSource,
    PageSource,
    RawImageSource,
    open_dump,
    private_anonymous_vmas,
)
from vmshare.sources.codecs import DUMP_DH_COMPRESSED_LZO, decompressor
from vmshare.sources.live import LivePageRun

PAGE = PAGE_SIZE


class Hang(Exception):
    pass


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """Every test here must finish within 20 s: a parser loop that never ends fails."""
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang("test exceeded 20 s (a reader hung)")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def collect(src: PageSource, chunk_pages: int = 4096) -> dict[tuple[str, int], bytes]:
    """(region key, page index) -> page content, copying out of the reused buffer."""
    out: dict[tuple[str, int], bytes] = {}
    keys = {r.key: r.size for r in src.regions()}
    for run in src.runs(chunk_pages):
        assert run.source == src.name
        assert run.region in keys
        assert len(run.data) % PAGE == 0 and run.npages >= 1
        assert run.npages <= chunk_pages
        assert (run.first_page + run.npages) * PAGE <= keys[run.region]
        for i in range(run.npages):
            key = (run.region, run.first_page + i)
            assert key not in out, f"page {key} yielded twice"
            out[key] = bytes(run.data[i * PAGE:(i + 1) * PAGE])
    return out


# ----------------------------------------------------------------- ELF ----
def test_elf_valid_yields_exactly_the_known_pages(tmp_path: Path) -> None:
    spec, expect = corpus.valid_elf_spec()
    path = tmp_path / "core.elf"
    path.write_bytes(corpus.build_elf(spec))
    with ElfCoreSource(path) as src:
        regions = src.regions()
        assert [(r.key, r.size) for r in regions] == [("gpa@0x0", 6 * PAGE),
                                                     ("gpa@0x100000", 2 * PAGE)]
        assert all(r.generation for r in regions)
        for chunk in (1, 2, 4096):
            assert collect(src, chunk) == expect   # the hole page (gpa@0x0, 5) is absent


def test_elf_pn_xnum_count_from_section_zero(tmp_path: Path) -> None:
    spec, expect = corpus.valid_elf_spec()
    spec.xnum = True
    path = tmp_path / "xnum.elf"
    path.write_bytes(corpus.build_elf(spec))
    with open_dump(path) as src:
        assert isinstance(src, ElfCoreSource)
        assert collect(src) == expect


def test_elf_unstored_segment_and_partial_page(tmp_path: Path) -> None:
    # QEMU writes p_offset=-1, p_filesz=0 for memory it did not store.
    blob = corpus.build_elf(corpus.ElfSpec([
        corpus.Seg(0, b"", offset=(1 << 64) - 1, filesz=0, memsz=4 * PAGE),
        corpus.Seg(0x10000, b"\x01" * 100, memsz=PAGE)]))
    path = tmp_path / "partial.elf"
    path.write_bytes(blob)
    with ElfCoreSource(path) as src:
        got = collect(src)
    assert got == {("gpa@0x10000", 0): b"\x01" * 100 + bytes(PAGE - 100)}


@pytest.mark.parametrize("case", [c for c in corpus.malformed_corpus()], ids=lambda c: c[0])
def test_malformed_dump_raises_dumperror_naming_the_problem(
        tmp_path: Path, case: tuple[str, bytes, tuple[str, ...]]) -> None:
    name, blob, words = case
    path = tmp_path / name
    path.write_bytes(blob)
    reader = ElfCoreSource if name.startswith("elf-") else KdumpSource
    with pytest.raises(DumpError) as info, reader(path) as src:
        for _ in src.runs():
            pass
    for word in words:
        assert word in str(info.value), f"{name}: {word!r} not in {info.value}"


def test_elf_file_shrinking_after_open_is_a_dumperror(tmp_path: Path) -> None:
    spec, _ = corpus.valid_elf_spec()
    path = tmp_path / "shrink.elf"
    path.write_bytes(corpus.build_elf(spec))
    with ElfCoreSource(path) as src:
        os.truncate(path, 1024)
        with pytest.raises(DumpError, match="truncated"):
            collect(src)


# --------------------------------------------------------------- kdump ----
@pytest.mark.parametrize("flattened", [True, False], ids=["flattened", "plain"])
def test_kdump_valid_yields_exactly_the_known_pages(tmp_path: Path, flattened: bool) -> None:
    pages = corpus.valid_kdump_pages()
    path = tmp_path / "vmcore"
    path.write_bytes(corpus.build_kdump(corpus.KdumpSpec(pages, 200, flattened=flattened)))
    with open_dump(path) as src:
        assert isinstance(src, KdumpSource)
        assert src.flattened is flattened
        assert [(r.key, r.size) for r in src.regions()] == [
            ("gpa@0x0", 3 * PAGE), ("gpa@0x5000", 2 * PAGE), ("gpa@0x64000", 4 * PAGE),
            ("gpa@0xc7000", PAGE)]
        for chunk in (1, 3, 4096):
            assert collect(src, chunk) == corpus.kdump_expect(pages)


def test_kdump_bitmap_runs_across_scan_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    import vmshare.sources.kdump as kdump
    monkeypatch.setattr(kdump, "_BITMAP_CHUNK", 1)     # 8 pfns per bitmap read
    pages = {pfn: corpus.page(pfn) for pfn in [*range(3, 21), 23, *range(30, 40)]}
    path = tmp_path / "vmcore"
    path.write_bytes(corpus.build_kdump(corpus.KdumpSpec(pages, 40)))
    with KdumpSource(path) as src:
        assert [r.key for r in src.regions()] == ["gpa@0x3000", "gpa@0x17000", "gpa@0x1e000"]
        assert collect(src) == corpus.kdump_expect(pages)


def test_missing_codec_names_the_package(tmp_path: Path) -> None:
    try:
        decompressor(DUMP_DH_COMPRESSED_LZO)
    except DumpError:
        pass
    else:
        pytest.skip("an LZO module is importable here; the missing-codec path cannot run")
    pages = {0: corpus.page(1)}
    path = tmp_path / "lzo.vmcore"
    path.write_bytes(corpus.build_kdump(corpus.KdumpSpec(pages, 8, status=DUMP_DH_COMPRESSED_LZO)))
    with pytest.raises(DumpError, match=r"lzo.*python-lzo"):
        KdumpSource(path)
    # The same per page, when the header does not announce it.
    path.write_bytes(corpus.build_kdump(corpus.KdumpSpec(
        pages, 8, desc_override={0: {"flags": DUMP_DH_COMPRESSED_LZO}})))
    with KdumpSource(path) as src, pytest.raises(DumpError, match=r"pfn 0x0.*python-lzo"):
        collect(src)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.dictionaries(st.integers(0, 300),
                               st.sampled_from(["zero", "a", "b", "noise"]), max_size=40),
       flattened=st.booleans())
def test_kdump_round_trip_property(tmp_path: Path, content: dict[int, str],
                                   flattened: bool) -> None:
    make = {"zero": lambda p: corpus.ZERO, "a": lambda p: corpus.page(1),
            "b": lambda p: corpus.page(p), "noise": corpus.noise_page}
    pages = {pfn: make[kind](pfn) for pfn, kind in content.items()}
    path = tmp_path / "prop.vmcore"
    path.write_bytes(corpus.build_kdump(corpus.KdumpSpec(pages, 301, flattened=flattened)))
    with KdumpSource(path) as src:
        assert collect(src, 7) == corpus.kdump_expect(pages)
        assert sum(r.size for r in src.regions()) == len(pages) * PAGE


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), kind=st.sampled_from(["elf", "kdump-flat", "kdump-plain"]))
def test_mutated_dumps_fail_only_with_dumperror(tmp_path: Path, data: st.DataObject,
                                                kind: str) -> None:
    if kind == "elf":
        blob = bytearray(corpus.build_elf(corpus.valid_elf_spec()[0]))
        limit = 400                       # headers and program headers
    else:
        blob = bytearray(corpus.build_kdump(corpus.KdumpSpec(
            corpus.valid_kdump_pages(), 200, flattened=kind == "kdump-flat")))
        limit = len(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, min(limit, len(blob)) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(1, len(blob))):]
    path = tmp_path / "mutant"
    path.write_bytes(bytes(blob))
    with contextlib.suppress(DumpError), open_dump(path) as src:
        for run in src.runs(5):
            assert len(run.data) % PAGE == 0


# ----------------------------------------------------------------- raw ----
def test_raw_image_single_region(tmp_path: Path) -> None:
    pages = [corpus.page(i) for i in range(5)]
    path = tmp_path / "ram.raw"
    path.write_bytes(b"".join(pages) + b"\x07" * 10)
    with open_dump(path) as src:
        assert isinstance(src, RawImageSource)
        assert [(r.key, r.size) for r in src.regions()] == [("gpa@0x0", 6 * PAGE)]
        expect = {("gpa@0x0", i): p for i, p in enumerate(pages)}
        expect[("gpa@0x0", 5)] = b"\x07" * 10 + bytes(PAGE - 10)
        assert collect(src, 2) == expect
    with pytest.raises(DumpError, match="neither an ELF core nor a kdump"):
        open_dump(path, raw_ok=False)


def test_closed_source_refuses_to_stream(tmp_path: Path) -> None:
    path = tmp_path / "ram.raw"
    path.write_bytes(corpus.page(1))
    src = RawImageSource(path)
    src.close()
    src.close()
    with pytest.raises(DumpError, match="closed"):
        next(src.runs())


def test_sources_satisfy_the_protocol(tmp_path: Path) -> None:
    path = tmp_path / "ram.raw"
    path.write_bytes(corpus.page(1))
    with RawImageSource(path) as src:
        assert isinstance(src, PageSource)


# ---------------------------------------------------------------- live ----
CHILD = textwrap.dedent("""
    import mmap, struct, sys
    n = 64
    m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in list(range(0, 10)) + list(range(20, 30)) + [63]:
        m[i * 4096:(i + 1) * 4096] = (struct.pack("<QQ", 0xfeed, i) * 256)
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    print(hex(addr), flush=True)
    sys.stdin.readline()
""")
TOUCHED = [*range(10), *range(20, 30), 63]


def known(i: int) -> bytes:
    return struct.pack("<QQ", 0xFEED, i) * 256


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    with corpus.mapping_process(CHILD) as pa:
        yield pa


def test_live_reads_exactly_the_touched_pages(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = child
    vma = Vma(addr, addr + 64 * PAGE, "rw-p", 0, "")
    with LiveProcessSource(proc.pid, [vma], backend_ids={addr: "test.ram"}) as src:
        assert src.name == f"pid:{proc.pid}"
        [region] = src.regions()
        assert region.key == "test.ram" and region.size == 64 * PAGE
        assert region.generation == f"{proc.pid}:{addr:x}:{64 * PAGE}:{src.start_time}"
        for chunk in (3, 4096):
            got = collect(src, chunk)
            assert got == {("test.ram", i): known(i) for i in TOUCHED}
        for run in src.runs(3):        # each run carries its pages' pagemap entries
            assert isinstance(run, LivePageRun) and run.pagemap.shape == (run.npages,)
            assert np.all(run.pagemap >> np.uint64(63) == 1)


def test_private_anonymous_vmas_lists_the_mapping(
        child: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = child
    vmas = private_anonymous_vmas(proc.pid)
    assert any(v.start <= addr and addr + 64 * PAGE <= v.end for v in vmas)
    with LiveProcessSource(proc.pid, vmas) as src:
        got = collect(src)
    by_addr = {int(key.split("@")[1], 16) + i * PAGE: data for (key, i), data in got.items()}
    for i in TOUCHED:
        assert by_addr[addr + i * PAGE] == known(i)
    assert all(addr + i * PAGE not in by_addr for i in range(10, 20))


def test_vanished_pid_is_processgone(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = child
    vma = Vma(addr, addr + 64 * PAGE, "rw-p", 0, "")
    src = LiveProcessSource(proc.pid, [vma])
    proc.kill()
    proc.wait()
    with pytest.raises(ProcessGone), src:
        collect(src)
    with pytest.raises(ProcessGone):
        LiveProcessSource(proc.pid, [vma])


def test_live_denied_without_privileges(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = child
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged uid")
    # Importing vmshare as uid 65534 is the one precondition (the checkout and
    # the venv readable by that user); it is checked on its own, so that a
    # PermissionError escaping LiveProcessSource (the bug this test exists to
    # catch) fails the test instead of looking like the precondition.
    probe = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        try:
            from vmshare.errors import AccessDenied
            from vmshare.model import Vma
            from vmshare.sources import LiveProcessSource
        except (ImportError, OSError) as exc:
            print("UNREADABLE", type(exc).__name__, exc)
            sys.exit(0)
        try:
            LiveProcessSource({proc.pid}, [Vma({addr}, {addr + PAGE}, "rw-p", 0, "")])
        except AccessDenied as exc:
            print("DENIED", exc)
    """)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         user=65534, group=65534, extra_groups=[], check=False)
    if res.stdout.startswith("UNREADABLE"):
        pytest.skip(f"uid 65534 cannot import vmshare from this checkout or venv: "
                    f"{res.stdout.strip()[:200]}")
    assert res.stdout.startswith("DENIED"), res.stderr
    assert "ptrace" in res.stdout and "sVirt" in res.stdout


def test_zlib_stream_longer_than_a_block_is_rejected(tmp_path: Path) -> None:
    pages = {0: corpus.page(1)}
    path = tmp_path / "long.vmcore"
    path.write_bytes(corpus.build_kdump(corpus.KdumpSpec(
        pages, 8, data_override={0: zlib.compress(corpus.page(1) + b"x" * 100)})))
    with KdumpSource(path) as src, pytest.raises(DumpError, match="pfn 0x0"):
        collect(src)


# ------------------------------------------------- what is not a dump file ----
def _not_files(tmp_path: Path) -> Iterator[tuple[str, str]]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                       # no writer: a blocking open would never return
    yield str(fifo), "a FIFO"
    yield "/dev/zero", "a character device"
    yield str(tmp_path), "a directory"


@pytest.mark.parametrize("reader", [open_dump, ElfCoreSource, KdumpSource, RawImageSource])
def test_fifo_device_or_directory_is_refused_without_blocking(tmp_path: Path,
                                                              reader: Callable[[str], object]
                                                              ) -> None:
    for path, kind in _not_files(tmp_path):
        with pytest.raises(DumpError) as exc:
            reader(path)
        assert str(exc.value) == (f"{path}: is {kind}, not a dump: give a regular file or "
                                  "a block device")


def test_unix_socket_is_refused(tmp_path: Path) -> None:
    import socket
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(DumpError, match="is a socket, not a dump"):
            open_dump(path)


def test_symlink_to_a_fifo_is_refused_by_its_target(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    with pytest.raises(DumpError, match="link: is a FIFO"):
        RawImageSource(tmp_path / "link")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A read-only loop device over 3 pages and one sector of known content."""
    import shutil
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup for a block device")
    data = corpus.page(1) + corpus.noise_page(2) + corpus.page(3) + b"\x07" * 512
    image = tmp_path / "ram.img"
    image.write_bytes(data)
    made = subprocess.run(["losetup", "--find", "--show", "--read-only", str(image)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"losetup cannot attach here: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        yield dev, data
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def test_block_device_is_a_raw_image_of_its_whole_size(loop_device: tuple[str, bytes]) -> None:
    dev, data = loop_device
    with open_dump(dev) as src:          # st_size is 0 for a device: the size is its end
        assert isinstance(src, RawImageSource) and src.file_size == len(data)
        pages = collect(src)
    padded = data + bytes(-len(data) % PAGE)
    assert pages == {("gpa@0x0", i): padded[i * PAGE:(i + 1) * PAGE] for i in range(4)}


@pytest.mark.parametrize("option", ["--dump", "--raw"])
def test_cli_predict_fifo_is_one_line_not_a_hang(tmp_path: Path, option: str) -> None:
    fifo = tmp_path / "guest.fifo"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "vmshare", "predict", option, str(fifo)],
                          capture_output=True, text=True, timeout=15,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"vmshare: error: {fifo}: is a FIFO, not a dump: give a regular " \
                          "file or a block device\n"
