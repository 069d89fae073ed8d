"""Page decompressors for kdump-compressed dumps.

zlib comes from the standard library. LZO, snappy and zstd need a third-party
module; when none is importable, asking for the codec raises a DumpError
that names it and the package to install.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from typing import Any

from vmshare.errors import DumpError

# page_desc.flags / disk_dump_header.status bits (QEMU include/sysemu/dump.h,
# makedumpfile diskdump_mod.h).
DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_INCOMPLETE = 0x8    # header status only
DUMP_DH_EXCLUDED_VMEMMAP = 0x10        # header status only
DUMP_DH_COMPRESSED_ZSTD = 0x20

CODEC_NAMES = {
    DUMP_DH_COMPRESSED_ZLIB: "zlib",
    DUMP_DH_COMPRESSED_LZO: "lzo",
    DUMP_DH_COMPRESSED_SNAPPY: "snappy",
    DUMP_DH_COMPRESSED_ZSTD: "zstd",
}
_INSTALL_HINT = {
    "lzo": "install python-lzo (pip install python-lzo) or cramjam",
    "snappy": "install python-snappy (pip install python-snappy) or cramjam",
    "zstd": "install zstandard (pip install zstandard)",
}

#: (compressed bytes, expected output size) -> output bytes
Decompressor = Callable[[bytes, int], bytes]


class CodecError(Exception):
    """The compressed data is corrupt (raised by a Decompressor)."""


def _zlib(data: bytes, out_size: int) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, out_size + 1)   # +1 reveals oversize output
    except zlib.error as exc:
        raise CodecError(str(exc)) from exc
    if not d.eof:
        raise CodecError("zlib stream incomplete" if len(out) <= out_size
                         else "zlib stream longer than a block")
    return out


def _try_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _lzo() -> Decompressor | None:
    lzo = _try_import("lzo")
    if lzo is not None:
        def run(data: bytes, out_size: int) -> bytes:
            try:   # header=False: raw lzo1x stream as QEMU and makedumpfile write it
                return bytes(lzo.decompress(data, False, out_size))
            except lzo.error as exc:
                raise CodecError(str(exc)) from exc
        return run
    cramjam = _try_import("cramjam")
    lzo_mod = getattr(cramjam, "lzo", None) or getattr(
        getattr(cramjam, "experimental", None), "lzo", None)
    if lzo_mod is not None and hasattr(lzo_mod, "decompress"):
        def run_cj(data: bytes, out_size: int) -> bytes:
            try:
                return bytes(lzo_mod.decompress(data, output_len=out_size))
            except Exception as exc:
                raise CodecError(str(exc)) from exc
        return run_cj
    return None


def _snappy() -> Decompressor | None:
    snappy = _try_import("snappy")
    if snappy is not None and hasattr(snappy, "uncompress"):
        def run(data: bytes, out_size: int) -> bytes:
            try:
                return bytes(snappy.uncompress(data))
            except Exception as exc:
                raise CodecError(str(exc)) from exc
        return run
    cramjam = _try_import("cramjam")
    if cramjam is not None and hasattr(cramjam, "snappy"):
        def run_cj(data: bytes, out_size: int) -> bytes:
            try:
                return bytes(cramjam.snappy.decompress_raw(data))
            except Exception as exc:
                raise CodecError(str(exc)) from exc
        return run_cj
    return None


def _zstd() -> Decompressor | None:
    zstandard = _try_import("zstandard")
    if zstandard is None:
        return None

    def run(data: bytes, out_size: int) -> bytes:
        try:
            return bytes(zstandard.ZstdDecompressor().decompress(
                data, max_output_size=out_size + 1))
        except zstandard.ZstdError as exc:
            raise CodecError(str(exc)) from exc
    return run


_FINDERS: dict[str, Callable[[], Decompressor | None]] = {
    "lzo": _lzo, "snappy": _snappy, "zstd": _zstd,
}


def decompressor(flag: int) -> Decompressor:
    """The decompressor for one page_desc compression flag.

    Raises DumpError naming the codec and the package to install when the
    codec is known but no Python module for it is importable, and for an
    unknown flag.
    """
    name = CODEC_NAMES.get(flag)
    if name is None:
        raise DumpError(f"unknown compression flag {flag:#x}")
    if name == "zlib":
        return _zlib
    found = _FINDERS[name]()
    if found is None:
        raise DumpError(f"this dump is compressed with {name} and no Python module for it is "
                        f"importable: {_INSTALL_HINT[name]}")
    return found
