"""Type stub of the C extension vmshare.sources._readpages (see _readpages.c)."""

from typing import Any, TypeAlias

import numpy.typing as npt
from _typeshed import ReadableBuffer as _RB
from _typeshed import WriteableBuffer as _WB

ReadableBuffer: TypeAlias = _RB | npt.NDArray[Any]
WriteableBuffer: TypeAlias = _WB | npt.NDArray[Any]

def pread_ranges(fd: int, offsets: ReadableBuffer, sizes: ReadableBuffer,
                 out: WriteableBuffer, start: int, /) -> int: ...
