"""Synthetic page mixes for the sketch and estimate tests: raw RAM images whose
pages are contents drawn with chosen multiplicities, and the exact figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vmshare.model import PAGE_SIZE


def content_ids(rng: np.random.Generator, mix: Sequence[tuple[int, int]], zero: int
                ) -> npt.NDArray[np.int64]:
    """Page contents in random order: ``mix`` lists (how many contents, copies of
    each); content 0 is the all-zero page, ``zero`` copies of it."""
    ids = [np.zeros(zero, np.int64)]
    next_id = 1
    for contents, copies in mix:
        ids.append(np.repeat(np.arange(next_id, next_id + contents, dtype=np.int64), copies))
        next_id += contents
    out = np.concatenate(ids)
    rng.shuffle(out)
    return out


def page_bytes(ids: npt.NDArray[np.int64], salt: int = 0) -> bytes:
    """Pages whose content is a function of the id (id 0: all zero)."""
    words = np.zeros((ids.size, PAGE_SIZE // 8), np.uint64)
    words[:, 0] = ids.astype(np.uint64)
    words[:, 7] = np.where(ids > 0, np.uint64(salt), np.uint64(0))
    return words.tobytes()


def write_vms(tmp: Path, ids: npt.NDArray[np.int64], parts: int, salt: int = 0) -> list[Path]:
    """Split the pages over ``parts`` raw images (VMs)."""
    paths = []
    for i, chunk in enumerate(np.array_split(ids, parts)):
        p = tmp / f"vm{i}.raw"
        p.write_bytes(page_bytes(chunk, salt))
        paths.append(p)
    return paths


def exact_sharing(per_vm: Sequence[npt.NDArray[np.int64]], max_page_sharing: int = 256
                  ) -> tuple[int, list[float]]:
    """pages_sharing, and each VM's fair share, counted exactly (content 0 included)."""
    allids = np.concatenate(per_vm)
    uniq, counts = np.unique(allids, return_counts=True)
    f = counts - (counts + max_page_sharing - 1) // max_page_sharing
    share = dict(zip(uniq.tolist(), (f / counts).tolist(), strict=True))
    per = [float(sum(share[c] for c in v.tolist())) for v in per_vm]
    return int(f.sum()), per
