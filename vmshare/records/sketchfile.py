"""Content sketches on disk: the data (``Sketch``: a host's VMs, each a sample of
its pages' contents with counts), the file format, the fleet key, and the rules
for where sketches may be kept.

File format, version 2 (little-endian; README "Sketch file format"):

    off  size  field
      0     8  magic b"VMSKETCH"
      8     2  version = 2
     10     2  hash algorithm = 2: a page's identity is SipHash-2-4 under the
               fleet key of its xxh3-128 (16 bytes); its decision value is
               SipHash-2-4 under the key of its fingerprint (8 words at fixed
               offsets, vmshare.engine._pages.FP_OFFSETS), or its identity when
               those words are all zero; only the decision's high 32 bits count
     12     4  page size (4096)
     16     8  key id: the first 8 bytes of SHA-256("vmshare-sketch-key-id\\0" + key)
     24     8  rate threshold: a content is sampled when its decision value < it
               (a multiple of 2**32; the rate asked for is threshold / 2**64)
     32     8  effective threshold (<= rate threshold; lower when the size cap
               was reached: the sample is then the contents under it)
     40     8  created, Unix seconds
     48     4  number of VMs
     52     2  host name length, then the host name (UTF-8)
    then per VM: name (u16 length, UTF-8), trust group (u16 length, UTF-8;
    empty: none), started (u64 Unix seconds: when the VM's QEMU started, or the
    dump was written), pages read (u64), all-zero pages (u64), entries (u32),
    the sampled contents' decision values (high 32 bits, u32 each, all under the
    effective threshold), their identities (u64 each; (decision, identity)
    strictly increasing), and each one's page count in this VM (u32 each, >= 1);
    then exact entries (u32), their identities (u64, strictly increasing, any
    decision) and counts (u32, >= 1): the contents of the VM's groups of many
    pages, counted whether sampled or not (never also among its samples);
    last, 32 bytes of SHA-256 over everything before them.

Version 1 (one value per page, the identity, which decided the sampling too)
is refused with an error naming it: make such sketches again.

The key never enters a file, only its id. Sketches tell which VMs hold equal
content (the side channel KSM itself has), so they are written 0600 into a
directory only their owner (root) can enter, and reading a key file that
others can read is refused.

May import model and errors only.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vmshare.errors import SketchError
from vmshare.model import PAGE_SIZE
from vmshare.records.atomic import AtomicWriteError, write_atomic

MAGIC = b"VMSKETCH"
VERSION = 2
HASH_ALGORITHM = 2
HASH_NAMES = {2: "xxh3-128+siphash-2-4, 2-line fingerprints"}
_HEAD = struct.Struct("<8sHHI8sQQQI")
_VM_FIXED = struct.Struct("<QQQI")
_SUM = 32
FULL = 1 << 64
MIN_KEY_BYTES = 16
#: the bits of a decision value that count (thresholds are multiples of 2**32)
DECISION_MASK = 0xFFFF_FFFF_0000_0000
STEP = 1 << 32
U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class SketchKey:
    """The fleet secret, as SipHash's two 64-bit key words, and its public id."""

    k0: int
    k1: int
    key_id: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> SketchKey:
        if len(secret) < MIN_KEY_BYTES:
            raise SketchError(f"sketch key has {len(secret)} bytes; at least "
                              f"{MIN_KEY_BYTES} are needed (e.g. head -c 32 /dev/urandom)")
        words = hashlib.sha256(b"vmshare-sketch-siphash\0" + secret).digest()
        ident = hashlib.sha256(b"vmshare-sketch-key-id\0" + secret).digest()[:8]
        return cls(int.from_bytes(words[:8], "little"), int.from_bytes(words[8:16], "little"),
                   ident)


@dataclass(frozen=True)
class VmSketch:
    name: str
    group: str | None
    started: int                      # Unix seconds: the VM's start, a dump's mtime
    pages: int                        # pages read
    zero_pages: int                   # all-zero pages among them (counted apart)
    values: U64 = field(repr=False)   # sample values, strictly increasing
    counts: npt.NDArray[np.uint32] = field(repr=False)
    heavy_values: U64 = field(repr=False, default_factory=lambda: np.zeros(0, np.uint64))
    heavy_counts: npt.NDArray[np.uint32] = field(
        repr=False, default_factory=lambda: np.zeros(0, np.uint32))
    #: each sample's decision value (multiples of 2**32); None: the values
    #: themselves decided (a sketch made up from values alone)
    groups: U64 | None = field(repr=False, default=None)

    @property
    def decisions(self) -> U64:
        """Each sample's decision value (what the threshold is compared with;
        samples of one value were sampled together)."""
        if self.groups is not None:
            return self.groups
        return self.values & np.uint64(DECISION_MASK)

    def nbytes(self) -> int:
        return 16 * self.values.size + 12 * self.heavy_values.size


@dataclass(frozen=True)
class Sketch:
    """A host's sketch: its VMs' samples, one key, one rate."""

    host: str
    key_id: bytes
    threshold: int                    # the rate asked for, as a threshold
    effective: int                    # the threshold the samples obey
    created: int
    vms: tuple[VmSketch, ...]

    @property
    def rate(self) -> float:
        return self.effective / FULL

    @property
    def nominal_rate(self) -> float:
        return self.threshold / FULL


def rate_threshold(rate: float) -> int:
    """The threshold for a sampling rate in (0, 1]: rate x 2**64 rounded down to a
    multiple of 2**32 (1 samples everything: FULL - 1 is above every decision)."""
    if not 0.0 < rate <= 1.0:
        raise SketchError(f"sampling rate must be in (0, 1], not {rate!r}")
    if rate == 1.0:
        return FULL - 1
    thr = int(rate * FULL) & DECISION_MASK
    if not thr:
        raise SketchError(f"sampling rate {rate!r} is below the smallest, 2**-32")
    return thr


def restrict(vm: VmSketch, threshold: int) -> VmSketch:
    """The same VM's sample at a lower threshold: exactly what sampling at that
    threshold would have kept (thresholds nest)."""
    dec = vm.decisions
    keep = dec < np.uint64(min(threshold, FULL - 1))
    return replace(vm, values=vm.values[keep], counts=vm.counts[keep], groups=dec[keep])


def merge(host: str, sketches: list[Sketch]) -> Sketch:
    """One host's sketch from its VMs' sketches (same key and rate; samples cut to
    the lowest effective threshold). Raises SketchError naming the mismatch."""
    if not sketches:
        raise SketchError("nothing to merge: no sketches given")
    check_compatible(sketches)
    low = min(s.effective for s in sketches)
    vms = [restrict(v, low) for s in sketches for v in s.vms]
    names = [v.name for v in vms]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SketchError(f"VM {dup[0]!r} is in more than one of the sketches merged")
    return Sketch(host, sketches[0].key_id, sketches[0].threshold, low,
                  int(time.time()), tuple(vms))


def check_compatible(sketches: list[Sketch], key_id: bytes | None = None,
                     names: list[str] | None = None) -> None:
    """Refuse sketches made with different keys or rates (naming both)."""
    first = sketches[0]
    want = key_id if key_id is not None else first.key_id
    labels = names or [s.host for s in sketches]
    for s, label in zip(sketches, labels, strict=True):
        if s.key_id != want:
            raise SketchError(f"{label}: made with another key (key id {s.key_id.hex()}, "
                              f"expected {want.hex()}): sketches of different keys "
                              "cannot be compared")
        if s.threshold != first.threshold:
            raise SketchError(f"{label}: sampled at rate {s.nominal_rate:.6g}, "
                              f"{labels[0]} at {first.nominal_rate:.6g}: sketches of "
                              "different rates are not combined; remake them at one --rate")


# ------------------------------------------------------------------ encoding
def _text(s: str) -> bytes:
    b = s.encode()
    if len(b) > 0xFFFF:
        raise SketchError(f"name too long for a sketch: {s[:40]!r}...")
    return struct.pack("<H", len(b)) + b


def encode(sk: Sketch) -> bytes:
    parts = [_HEAD.pack(MAGIC, VERSION, HASH_ALGORITHM, PAGE_SIZE, sk.key_id, sk.threshold,
                        sk.effective, sk.created, len(sk.vms)), _text(sk.host)]
    for v in sk.vms:
        parts += [_text(v.name), _text(v.group or ""),
                  _VM_FIXED.pack(v.started, v.pages, v.zero_pages, v.values.size),
                  (v.decisions >> np.uint64(32)).astype("<u4").tobytes(),
                  v.values.astype("<u8").tobytes(), v.counts.astype("<u4").tobytes(),
                  struct.pack("<I", v.heavy_values.size),
                  v.heavy_values.astype("<u8").tobytes(),
                  v.heavy_counts.astype("<u4").tobytes()]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


class _Reader:
    def __init__(self, data: bytes, label: str) -> None:
        self.data, self.pos, self.label = data, 0, label

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise SketchError(f"{self.label}: truncated: {what} at byte {self.pos} needs "
                              f"{n} bytes, the file has {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def text(self, what: str) -> str:
        (n,) = struct.unpack("<H", self.take(2, what + " length"))
        try:
            return self.take(n, what).decode()
        except UnicodeDecodeError as exc:
            raise SketchError(f"{self.label}: corrupt: {what} is not UTF-8") from exc


def decode(data: bytes, label: str) -> Sketch:
    """Parse and validate a sketch file's bytes. Raises SketchError naming what is wrong."""
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise SketchError(f"{label}: not a vmshare sketch (wrong magic {data[:8]!r})")
    r = _Reader(data, label)
    _, version, alg, page, key_id, thr, eff, created, nvm = _HEAD.unpack(
        r.take(_HEAD.size, "header"))
    if version != VERSION:
        again = " (an older vmshare's: make the sketch again)" if version < VERSION else ""
        raise SketchError(f"{label}: sketch format version {version}{again}; this vmshare "
                          f"reads version {VERSION} only")
    if alg not in HASH_NAMES:
        raise SketchError(f"{label}: unknown hash algorithm {alg}")
    host = r.text("host name")
    vms = tuple(_read_vm(r, i) for i in range(nvm))
    left = len(data) - r.pos
    if left < _SUM:
        raise SketchError(f"{label}: truncated: {left} of the checksum's {_SUM} bytes")
    if left > _SUM:
        raise SketchError(f"{label}: corrupt: {left - _SUM} bytes after the last VM")
    if hashlib.sha256(data[:-_SUM]).digest() != data[-_SUM:]:
        raise SketchError(f"{label}: checksum mismatch: the file is corrupt")
    if page != PAGE_SIZE:
        raise SketchError(f"{label}: made for {page}-byte pages, this host has {PAGE_SIZE}")
    if not 0 < eff <= thr:
        raise SketchError(f"{label}: corrupt: effective threshold {eff} not in (0, {thr}]")
    for v in vms:
        _check_vm(v, eff, label)
    return Sketch(host, key_id, thr, eff, created, vms)


def _read_vm(r: _Reader, i: int) -> VmSketch:
    name = r.text(f"VM {i} name")
    group = r.text(f"VM {i} trust group") or None
    started, pages, zero, n = _VM_FIXED.unpack(r.take(_VM_FIXED.size, f"VM {i} figures"))
    dec = np.frombuffer(r.take(4 * n, f"VM {i} decisions"), "<u4").astype(np.uint64)
    values = np.frombuffer(r.take(8 * n, f"VM {i} samples"), "<u8").astype(np.uint64)
    counts = np.frombuffer(r.take(4 * n, f"VM {i} counts"), "<u4").astype(np.uint32)
    (nh,) = struct.unpack("<I", r.take(4, f"VM {i} heavy entries"))
    hv = np.frombuffer(r.take(8 * nh, f"VM {i} heavy values"), "<u8").astype(np.uint64)
    hc = np.frombuffer(r.take(4 * nh, f"VM {i} heavy counts"), "<u4").astype(np.uint32)
    return VmSketch(name, group, started, pages, zero, values, counts, hv, hc,
                    dec << np.uint64(32))


def _check_vm(v: VmSketch, eff: int, label: str) -> None:
    d, x = v.decisions, v.values
    if d.size and (np.any((d[1:] < d[:-1]) | ((d[1:] == d[:-1]) & (x[1:] <= x[:-1])))
                   or int(d[-1]) >= eff):
        raise SketchError(f"{label}: corrupt: VM {v.name!r}'s samples are not increasing "
                          "values under the threshold")
    h = v.heavy_values
    if h.size and np.any(h[1:] <= h[:-1]):
        raise SketchError(f"{label}: corrupt: VM {v.name!r}'s heavy values are not increasing")
    if h.size and v.values.size and np.isin(h, v.values, assume_unique=True).any():
        raise SketchError(f"{label}: corrupt: VM {v.name!r} has contents both sampled and "
                          "heavy")
    held = int(v.counts.sum(dtype=np.uint64)) + int(v.heavy_counts.sum(dtype=np.uint64))
    if np.any(v.counts == 0) or np.any(v.heavy_counts == 0) or held + v.zero_pages > v.pages:
        raise SketchError(f"{label}: corrupt: VM {v.name!r}'s counts exceed its pages")


# ------------------------------------------------------------------ files
def _check_private_dir(directory: Path) -> None:
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return                           # write_atomic creates it 0700
    except OSError as exc:
        raise SketchError(f"{directory}: cannot check the sketch directory: "
                          f"{exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SketchError(f"{directory}: not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SketchError(f"{directory}: sketches are kept only in a directory of this "
                          f"user's alone (mode 0700 or stricter; it is "
                          f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): "
                          "they reveal which VMs hold equal content")


def write_sketch(path: Path, sk: Sketch) -> None:
    """Write ``sk`` to ``path`` (0600, atomically), refusing a directory others can
    enter. Raises SketchError."""
    path = Path(path)
    _check_private_dir(path.parent)
    try:
        write_atomic(path, encode(sk), 0o600)
    except AtomicWriteError as exc:
        raise SketchError(str(exc)) from exc
    except OSError as exc:
        raise SketchError(f"{path}: cannot write sketch: {exc.strerror}") from exc


def read_sketch(path: Path, *, key_id: bytes | None = None) -> Sketch:
    """Read and validate a sketch file (and its key id, when given). Raises SketchError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SketchError(f"{path}: cannot read sketch: {exc.strerror}") from exc
    sk = decode(data, str(path))
    if key_id is not None:
        check_compatible([sk], key_id, [str(path)])
    return sk


def _read_private(path: Path, what: str, hint: str) -> bytes:
    """The first 4 KiB of a regular file only its owner (root or this user) may
    read, stripped. Raises SketchError naming ``what`` (missing, others' too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise SketchError(f"{path}: cannot open the {what}: {exc.strerror} ({hint})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SketchError(f"{path}: the {what} must be a regular file")
        if st.st_mode & 0o077 or st.st_uid not in (0, os.geteuid()):
            raise SketchError(f"{path}: the {what} is readable or owned by others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}); "
                              "chmod 600 it")
        return os.read(fd, 4096).strip()
    except OSError as exc:
        raise SketchError(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def load_key(path: Path) -> SketchKey:
    """The fleet's sketch key from a file that only its owner (root) may read.
    Raises SketchError (missing, readable by others, too short)."""
    return SketchKey.from_secret(_read_private(
        path, "sketch key", "set [sketch] key_file; make one with head -c 32 /dev/urandom"))


def load_token(path: Path) -> bytes:
    """The bearer token of the sketch endpoint (``[sketch] token_file``), from a
    file only its owner (root) may read: printable ASCII, at least MIN_KEY_BYTES
    long. Raises SketchError naming what is wrong (never the token)."""
    token = _read_private(path, "sketch token", "set [sketch] token_file; make one with "
                          "head -c 24 /dev/urandom | base64")
    if len(token) < MIN_KEY_BYTES or not all(33 <= b < 127 for b in token):
        raise SketchError(f"{path}: the sketch token must be at least {MIN_KEY_BYTES} "
                          "printable ASCII characters without spaces (e.g. "
                          "head -c 24 /dev/urandom | base64)")
    return token
