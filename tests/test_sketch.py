"""Content sketches: SipHash against its published vector, the keyed page values
against a reference, sampling by content, reading in place (mapped) against
streaming, a file that shrinks under the mapping, the size cap, the file
format (every corruption refused, named), keys and the rules for where
sketches may be kept."""

from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt
import pytest
import xxhash

from tests.dump_corpus import build_elf, valid_elf_spec
from tests.sketch_mixes import content_ids, write_vms
from vmshare.engine._pages import FP_OFFSETS, fp_values, id_values, repeated, siphash24
from vmshare.errors import DumpError, SketchError
from vmshare.model import PAGE_SIZE, PageRun, Region
from vmshare.prediction import sketch as sketch_module
from vmshare.prediction.predict import dump_target
from vmshare.prediction.sketch import sketch_pages, sketch_targets
from vmshare.records.sketchfile import (
    FULL,
    Sketch,
    SketchKey,
    VmSketch,
    decode,
    encode,
    load_key,
    merge,
    rate_threshold,
    read_sketch,
    restrict,
    write_sketch,
)
from vmshare.sources.base import DEFAULT_CHUNK_PAGES, WHOLE, FileSource, PageSource, Part, ReadInto

KEY = SketchKey.from_secret(b"k" * 32)
MASK = (1 << 64) - 1


def rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & MASK


def siphash_ref(k: bytes, msg: bytes) -> int:
    """SipHash-2-4, one byte string at a time, as the paper writes it."""
    k0, k1 = int.from_bytes(k[:8], "little"), int.from_bytes(k[8:], "little")
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D,
         k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rnd() -> None:
        v[0] = (v[0] + v[1]) & MASK
        v[1] = rotl(v[1], 13) ^ v[0]
        v[0] = rotl(v[0], 32)
        v[2] = (v[2] + v[3]) & MASK
        v[3] = rotl(v[3], 16) ^ v[2]
        v[0] = (v[0] + v[3]) & MASK
        v[3] = rotl(v[3], 21) ^ v[0]
        v[2] = (v[2] + v[1]) & MASK
        v[1] = rotl(v[1], 17) ^ v[2]
        v[2] = rotl(v[2], 32)

    full = len(msg) // 8 * 8
    blocks = [int.from_bytes(msg[i:i + 8], "little") for i in range(0, full, 8)]
    blocks.append(int.from_bytes(msg[full:], "little") | (len(msg) & 0xFF) << 56)
    for m in blocks:
        v[3] ^= m
        rnd()
        rnd()
        v[0] ^= m
    v[2] ^= 0xFF
    for _ in range(4):
        rnd()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def test_siphash_matches_the_reference_and_its_published_vector() -> None:
    k = bytes(range(16))
    assert siphash_ref(k, bytes(range(15))) == 0xA129CA6149BE45E5
    k0, k1 = int.from_bytes(k[:8], "little"), int.from_bytes(k[8:], "little")
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 8, 15, 16, 64, 100):
        msg = rng.bytes(n)
        assert siphash24(k0, k1, msg) == siphash_ref(k, msg), n
    assert siphash24(k0, k1, bytes(range(15))) == 0xA129CA6149BE45E5


def test_page_values_match_the_reference() -> None:
    rng = np.random.default_rng(2)
    pages = bytearray(rng.bytes(5 * PAGE_SIZE))
    pages[PAGE_SIZE:2 * PAGE_SIZE] = bytes(PAGE_SIZE)                 # all zero
    sparse = bytearray(PAGE_SIZE)
    sparse[100] = 1                                                     # outside the lines
    pages[2 * PAGE_SIZE:3 * PAGE_SIZE] = sparse
    k = KEY.k0.to_bytes(8, "little") + KEY.k1.to_bytes(8, "little")
    dec, sp = np.empty(5, np.uint64), np.empty(5, np.uint8)
    fp_values(pages, KEY.k0, KEY.k1, dec, sp)
    ident = np.empty(4, np.uint64)
    id_values(pages, np.array([4, 0, 2, 1]), KEY.k0, KEY.k1, ident)
    for i in range(5):
        page = bytes(pages[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        lines = b"".join(page[o:o + 64] for o in FP_OFFSETS)
        want = siphash_ref(k, xxhash.xxh3_128_intdigest(lines).to_bytes(16, "little"))
        assert int(dec[i]) == want and bool(sp[i]) == (lines == bytes(len(lines)))
    for got, i in zip(ident.tolist(), (4, 0, 2, 1), strict=True):   # 1: all zero
        page = bytes(pages[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        assert got == siphash_ref(k, xxhash.xxh3_128_intdigest(page).to_bytes(16, "little"))
    assert sp.tolist() == [0, 1, 1, 0, 0]
    with pytest.raises(IndexError, match="outside"):
        id_values(pages, np.array([5]), KEY.k0, KEY.k1, ident[:1])


def test_a_file_that_shrinks_under_the_mapping_is_an_error_not_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vm.raw"
    path.write_bytes(np.random.default_rng(3).bytes(64 * PAGE_SIZE))
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 64 * PAGE_SIZE, prot=mmap.PROT_READ)
    os.truncate(path, 10 * PAGE_SIZE)
    out, sp = np.empty(64, np.uint64), np.empty(64, np.uint8)
    with pytest.raises(OSError, match="bus error reading page 10") as exc:
        fp_values(mm, 1, 2, out, sp)
    assert exc.value.errno == errno.EIO
    with pytest.raises(OSError, match="page 12"):
        id_values(mm, np.array([3, 12]), 1, 2, out[:2])
    fp_values(memoryview(mm)[:10 * PAGE_SIZE], 1, 2, out[:10], sp[:10])   # the rest is fine
    mm.close()
    path.write_bytes(bytes(64 * PAGE_SIZE))
    src = dump_target(str(path), raw=True).open()
    assert src is not None
    os.truncate(path, 60 * PAGE_SIZE)
    with pytest.raises(DumpError, match="shrank since it was opened"):
        sketch_pages(src, KEY, 1 << 62)
    path.write_bytes(bytes(64 * PAGE_SIZE))
    real = sketch_module._fingerprints

    def shrinking(runs: list[PageRun], key: SketchKey) -> object:
        os.truncate(path, PAGE_SIZE)                       # after the mapping, before reading
        return real(runs, key)

    monkeypatch.setattr(sketch_module, "_fingerprints", shrinking)
    with pytest.raises(DumpError, match="shrank while it was read"):
        sketch_pages(src, KEY, 1 << 62)
    src.close()


def same_sketch(a: VmSketch, b: VmSketch) -> None:
    assert (a.pages, a.zero_pages) == (b.pages, b.zero_pages)
    for f in ("values", "counts", "heavy_values", "heavy_counts", "decisions"):
        assert getattr(a, f).tolist() == getattr(b, f).tolist(), f


def test_reading_in_place_gives_what_streaming_gives(tmp_path: Path) -> None:
    ids = content_ids(np.random.default_rng(5), [(300, 1), (100, 3), (10, 12)], zero=30)
    (path,) = write_vms(tmp_path, ids, 1)
    with open(path, "ab") as f:
        f.write(b"\1" * 100)                                  # a partial last page
    mapped = dump_target(str(path), raw=True).open()
    assert mapped is not None
    assert isinstance(mapped, FileSource) and mapped.stored_extents() is not None
    for thr in (1 << 62, FULL - 1):
        a, ta = sketch_pages(mapped, KEY, thr)
        b, tb = sketch_pages(_Stream(path), KEY, thr)
        same_sketch(a, b)
        assert ta == tb and a.zero_pages == 30 and a.pages == ids.size + 1
    mapped.close()
    # an ELF core: its segments mapped in place, the hole tail not read
    spec, expect = valid_elf_spec()
    elf = tmp_path / "vm.elf"
    elf.write_bytes(build_elf(spec))
    src = dump_target(str(elf), raw=False).open()
    assert src is not None and isinstance(src, FileSource)
    with src.mapped_runs() as runs:
        got = {(r.region, r.first_page + i): bytes(r.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
               for r in runs for i in range(len(r.data) // PAGE_SIZE)}
    assert got == expect
    same_sketch(sketch_pages(src, KEY, FULL - 1)[0], sketch_pages(_Stream(elf), KEY,
                                                                  FULL - 1)[0])
    src.close()


class _Stream:
    """A dump read as a stream (as a live source is): not a file source. Each
    call opens the dump afresh and closes it."""

    read_into: ReadInto | None = None

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.path = path

    def _open(self) -> PageSource:
        src = dump_target(str(self.path), raw=self.path.suffix == ".raw").open()
        assert src is not None
        return src

    def regions(self) -> list[Region]:
        with self._open() as src:
            return src.regions()

    def runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES, part: Part = WHOLE
             ) -> Iterator[PageRun]:
        with self._open() as src:
            yield from src.runs(chunk_pages=7)       # small runs, whatever is asked

    def read_pages(self, region: str, pages: npt.NDArray[np.int64], into: memoryview) -> None:
        with self._open() as src:
            src.read_pages(region, pages, into)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def small_sketch(tmp_path: Path, rate: float = 0.25, key: SketchKey = KEY) -> Sketch:
    ids = content_ids(np.random.default_rng(3), [(300, 1), (200, 2), (50, 5), (5, 40)],
                      zero=40)
    paths = write_vms(tmp_path, ids, 2)
    targets = [dump_target(str(p), raw=True) for p in paths]
    return sketch_targets(targets, key, host="h1", rate=rate, groups={
        str(paths[0]): "g1", str(paths[1]): "g2"})


def test_sampling_is_by_content_zero_pages_apart(tmp_path: Path) -> None:
    sk = small_sketch(tmp_path, rate=1.0)
    total = sum(v.pages for v in sk.vms)
    assert total == 300 + 400 + 250 + 200 + 40
    assert sum(v.zero_pages for v in sk.vms) == 40
    allv = np.concatenate([v.values for v in sk.vms] + [v.heavy_values for v in sk.vms])
    assert np.unique(allv).size == 555            # every nonzero content, once per content
    assert sum(int(v.counts.sum()) + int(v.heavy_counts.sum()) for v in sk.vms) == 1150
    # the 5 contents on 40 pages (about 20 per VM) are counted exactly in each VM
    assert sum(v.heavy_values.size for v in sk.vms) == 10
    assert all(int(c) >= 8 for v in sk.vms for c in v.heavy_counts)
    assert [v.group for v in sk.vms] == ["g1", "g2"]
    low = small_sketch(tmp_path, rate=0.25)       # a subset: thresholds nest
    for a, b in zip(low.vms, sk.vms, strict=True):
        assert set(a.values.tolist()) <= set(b.values.tolist())
        assert 0 < a.values.size < b.values.size


def test_size_cap_lowers_the_rate_and_keeps_the_smallest(tmp_path: Path) -> None:
    ids = content_ids(np.random.default_rng(4), [(2000, 1)], zero=0)
    target = dump_target(str(write_vms(tmp_path, ids, 1)[0]), raw=True)
    full = sketch_targets([target], KEY, host="h", rate=1.0)
    capped = sketch_targets([target], KEY, host="h", rate=1.0, max_entries=100)
    assert capped.vms[0].values.size == 100            # each content its own group here
    assert capped.vms[0].values.tolist() == full.vms[0].values[:100].tolist()
    assert capped.effective == int(full.vms[0].decisions[100]) and capped.threshold == FULL - 1
    assert capped.effective % 2**32 == 0
    same_sketch(restrict(full.vms[0], capped.effective), capped.vms[0])


def test_round_trip_and_merge(tmp_path: Path) -> None:
    sk = small_sketch(tmp_path)
    back = decode(encode(sk), "f")
    assert back.host == "h1" and back.key_id == KEY.key_id
    for a, b in zip(back.vms, sk.vms, strict=True):
        assert (a.name, a.group, a.pages, a.zero_pages) == (b.name, b.group, b.pages,
                                                             b.zero_pages)
        assert a.values.tolist() == b.values.tolist() and a.counts.tolist() == b.counts.tolist()
        assert a.heavy_values.tolist() == b.heavy_values.tolist()
        assert a.heavy_counts.tolist() == b.heavy_counts.tolist() and a.heavy_values.size
        assert a.decisions.tolist() == b.decisions.tolist()
    one = Sketch("a", sk.key_id, sk.threshold, sk.effective, 0, sk.vms[:1])
    two = Sketch("b", sk.key_id, sk.threshold, sk.effective // 2, 0, sk.vms[1:])
    host = merge("host", [one, two])
    assert host.effective == sk.effective // 2
    assert all(int(v.decisions.max()) < host.effective for v in host.vms)
    with pytest.raises(SketchError, match="more than one"):
        merge("host", [one, one])


def corrupt_cases(data: bytes) -> dict[str, tuple[bytes, str]]:
    head = struct.calcsize("<8sHHI8sQQQI")
    return {
        "magic": (b"XXSKETCH" + data[8:], "wrong magic"),
        "version": (data[:8] + struct.pack("<H", 1) + data[10:],
                    r"version 1 \(an older vmshare's: make the sketch again\)"),
        "newer version": (data[:8] + struct.pack("<H", 3) + data[10:], "version 3; this"),
        "algorithm": (data[:10] + struct.pack("<H", 9) + data[12:], "hash algorithm 9"),
        "truncated": (data[:-10], "truncated"),
        "truncated header": (data[:20], "truncated"),
        "truncated samples": (data[:head + 200], "truncated"),
        "flipped sample": (data[:head + 100] + bytes([data[head + 100] ^ 1])
                           + data[head + 101:], "checksum mismatch"),
        "flipped checksum": (data[:-1] + bytes([data[-1] ^ 1]), "checksum mismatch"),
        "trailing": (data + b"x" * 40, "after the last VM"),
        "empty": (b"", "wrong magic"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases(b"\0" * 400)))
def test_every_corruption_is_refused_by_name(tmp_path: Path, case: str) -> None:
    data = encode(small_sketch(tmp_path))
    bad, why = corrupt_cases(data)[case]
    with pytest.raises(SketchError, match=why):
        decode(bad, "f")


def resealed(sk: Sketch, **changes: object) -> bytes:
    return encode(dataclasses.replace(sk, **changes))  # type: ignore[arg-type]


def test_bad_content_under_a_good_checksum_is_refused(tmp_path: Path) -> None:
    sk = small_sketch(tmp_path)
    v = sk.vms[0]
    unsorted = dataclasses.replace(v, values=v.values[::-1].copy(),
                                   groups=v.decisions[::-1].copy())
    with pytest.raises(SketchError, match="not increasing"):
        decode(resealed(sk, vms=(unsorted,)), "f")
    same_group = dataclasses.replace(v, values=v.values.copy(), groups=np.zeros_like(v.decisions))
    same_group.values[:2] = same_group.values[1::-1].copy()     # one group, out of order
    with pytest.raises(SketchError, match="not increasing"):
        decode(resealed(sk, vms=(same_group,)), "f")
    zero = dataclasses.replace(v, counts=np.zeros_like(v.counts))
    with pytest.raises(SketchError, match="counts"):
        decode(resealed(sk, vms=(zero,)), "f")
    both = dataclasses.replace(v, heavy_values=v.values[:1].copy(),
                               heavy_counts=v.counts[:1].copy())
    with pytest.raises(SketchError, match="both sampled and heavy"):
        decode(resealed(sk, vms=(both,)), "f")
    with pytest.raises(SketchError, match="effective threshold"):
        decode(resealed(sk, effective=sk.threshold + 1), "f")


def test_other_key_or_rate_is_refused(tmp_path: Path) -> None:
    sk = small_sketch(tmp_path)
    other = small_sketch(tmp_path, key=SketchKey.from_secret(b"z" * 32))
    slower = small_sketch(tmp_path, rate=0.125)
    with pytest.raises(SketchError, match="another key"):
        merge("h", [sk, other])
    with pytest.raises(SketchError, match="different rates"):
        merge("h", [sk, slower])
    d = tmp_path / "sk"
    d.mkdir(mode=0o700)
    write_sketch(d / "a.sketch", other)
    with pytest.raises(SketchError, match="another key"):
        read_sketch(d / "a.sketch", key_id=KEY.key_id)


def test_files_are_private_and_open_directories_refused(tmp_path: Path) -> None:
    sk = small_sketch(tmp_path)
    d = tmp_path / "new" / "sketches"
    write_sketch(d / "h1.sketch", sk)
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert os.stat(d / "h1.sketch").st_mode & 0o777 == 0o600
    assert read_sketch(d / "h1.sketch").vms[0].name == sk.vms[0].name
    opened = tmp_path / "open"
    opened.mkdir(mode=0o755)
    os.chmod(opened, 0o755)
    with pytest.raises(SketchError, match="0755"):
        write_sketch(opened / "h1.sketch", sk)
    assert not (opened / "h1.sketch").exists()


def test_key_file_rules(tmp_path: Path) -> None:
    key = tmp_path / "sketch.key"
    key.write_bytes(b"s" * 32)
    os.chmod(key, 0o644)
    with pytest.raises(SketchError, match="readable or owned by others"):
        load_key(key)
    os.chmod(key, 0o600)
    assert load_key(key).key_id == SketchKey.from_secret(b"s" * 32).key_id
    key.write_bytes(b"short")
    with pytest.raises(SketchError, match="at least 16"):
        load_key(key)
    with pytest.raises(SketchError, match="cannot open"):
        load_key(tmp_path / "missing.key")
    assert SketchKey.from_secret(b"a" * 16).key_id != SketchKey.from_secret(b"b" * 16).key_id


# ---------------------------------------------------------------- the commands
def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from vmshare.cli.main import main
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_sketch_command_writes_shows_and_merges(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ids = content_ids(np.random.default_rng(8), [(400, 1), (100, 2)], zero=10)
    a, b = write_vms(tmp_path, ids, 2)
    key = tmp_path / "key"
    key.write_bytes(b"c" * 32)
    os.chmod(key, 0o600)
    d = tmp_path / "sk"
    common = ["--key-file", str(key), "--config", str(tmp_path / "none.toml")]
    (tmp_path / "none.toml").write_text("")
    code, out, err = run_cli(capsys, "sketch", "--raw", str(a), "--host", "ha", "--out",
                             str(d / "a.sketch"), "--rate", "1/2", *common)
    assert code == 0, err
    assert out.startswith(f"wrote {d / 'a.sketch'}: host 'ha', 1 VM(s)") and "rate 1/2" in out
    code, out, err = run_cli(capsys, "sketch", "--raw", str(b), "--host", "hb", "--out",
                             str(d / "b.sketch"), "--rate", "0.5", *common)
    assert code == 0, err
    code, out, err = run_cli(capsys, "sketch", "--merge", str(d / "a.sketch"),
                             str(d / "b.sketch"), "--host", "h", "--out", str(d / "h.sketch"),
                             "--json", *common)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["host"] == "h" and [v["name"] for v in doc["vms"]] == [str(a), str(b)]
    assert doc["vms"][0]["trust_group"] == "default"
    code, out, err = run_cli(capsys, "sketch", "--show", str(d / "h.sketch"), *common)
    assert code == 0 and "2 VM(s)" in out, err
    # one line for each refusal, nothing written
    code, out, err = run_cli(capsys, "sketch", "--raw", str(b), "--out", str(d / "c.sketch"),
                             "--rate", "1/4", *common)
    assert code == 0
    code, _, err = run_cli(capsys, "sketch", "--merge", str(d / "a.sketch"),
                           str(d / "c.sketch"), "--out", str(d / "x.sketch"), *common)
    assert code == 1 and "different rates" in err and len(err.splitlines()) == 1
    assert not (d / "x.sketch").exists()
    os.chmod(key, 0o640)
    code, _, err = run_cli(capsys, "sketch", "--show", str(d / "h.sketch"), *common)
    assert code == 1 and "chmod 600" in err and len(err.splitlines()) == 1
    os.chmod(key, 0o600)
    (d / "bad.sketch").write_bytes((d / "h.sketch").read_bytes()[:-5])
    code, _, err = run_cli(capsys, "sketch", "--show", str(d / "bad.sketch"), *common)
    assert code == 1 and "truncated" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, "sketch", "--rate", "2", "--raw", str(a), *common)
    assert exc.value.code == 2 and "(0, 1]" in capsys.readouterr().err


def test_predict_estimate_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = content_ids(np.random.default_rng(8), [(400, 1), (100, 2)], zero=10)
    (a,) = write_vms(tmp_path, ids, 1)
    code, out, err = run_cli(capsys, "predict", "--estimate", "--rate", "1", "--raw", str(a),
                             "--json")
    assert code == 0, err
    assert json.loads(out)["totals"]["pages_sharing"]["pages"] == 100 + 9   # pairs + zeros
    code, _, err = run_cli(capsys, "predict", "--rate", "1/2", "--raw", str(a))
    assert code == 2 and "add --estimate" in err
    code, _, err = run_cli(capsys, "predict", "--estimate", "--scans", "2", "--raw", str(a))
    assert code == 2 and "--scans" in err


def test_repeated_counts_like_numpy() -> None:
    rng = np.random.default_rng(6)
    for n in (0, 1, 7, 8, 100, 5000):
        values = rng.integers(0, max(1, n // 6), n).astype(np.uint64) << np.uint64(32)
        out = np.empty(n, np.uint8)
        repeated(values, 8, out)
        _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        assert out.astype(bool).tolist() == (counts[inverse.reshape(-1)] >= 8).tolist()


def test_threads_give_the_sketch_one_thread_gives(tmp_path: Path) -> None:
    ids = content_ids(np.random.default_rng(9), [(500, 1), (200, 2), (20, 9)], zero=20)
    targets = [dump_target(str(p), raw=True) for p in write_vms(tmp_path, ids, 3)]
    one = sketch_targets(targets, KEY, host="h", rate=0.25, workers=1)
    three = sketch_targets(targets, KEY, host="h", rate=0.25, workers=3)
    assert [v.name for v in one.vms] == [v.name for v in three.vms] == [t.name for t in targets]
    for a, b in zip(one.vms, three.vms, strict=True):
        same_sketch(a, b)


def test_thresholds_are_multiples_of_two_to_the_32() -> None:
    assert rate_threshold(1 / 16) == 2**60 and rate_threshold(1.0) == FULL - 1
    assert rate_threshold(1 / 3) % 2**32 == 0
    assert 0 < 1 / 3 - rate_threshold(1 / 3) / FULL < 2**-32
    with pytest.raises(SketchError, match="below the smallest"):
        rate_threshold(2**-40)
