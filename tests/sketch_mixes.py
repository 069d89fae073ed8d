"""Synthetic page mixes for the sketch and estimate tests: raw RAM images whose
pages are contents drawn with chosen multiplicities, and the exact figures."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vmshare.model import PAGE_SIZE, PageRun, Region
from vmshare.prediction.targets import Target
from vmshare.sources.base import WHOLE, Part, ReadInto, mine


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


class GeneratedSource:
    """A page source whose pages are made from content ids as they are read (no
    file): for gigabytes of synthetic guest memory in tests and benchmarks."""

    def __init__(self, name: str, ids: npt.NDArray[np.int64], salt: int = 0) -> None:
        self.name = name
        self.ids = ids
        self.salt = salt
        #: where runs are made (None: a new buffer for each run)
        self.read_into: ReadInto | None = None

    def regions(self) -> list[Region]:
        return [Region("ram", self.ids.size * PAGE_SIZE, "g")]

    def runs(self, chunk_pages: int = 4096, part: Part = WHOLE) -> Iterator[PageRun]:
        for index, first in enumerate(range(0, self.ids.size, chunk_pages), 1):
            if not mine(index, part):
                continue
            data = page_bytes(self.ids[first:first + chunk_pages], self.salt)
            if self.read_into is None:
                yield PageRun(self.name, "ram", first, memoryview(data))
                continue
            view = self.read_into(len(data))
            view[:] = data
            yield PageRun(self.name, "ram", first, view)

    def read_pages(self, region: str, pages: npt.NDArray[np.int64], into: memoryview) -> None:
        into[:pages.size * PAGE_SIZE] = page_bytes(self.ids[pages], self.salt)

    def close(self) -> None:
        pass

    def __enter__(self) -> GeneratedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generated_target(name: str, ids: npt.NDArray[np.int64], salt: int = 0) -> Target:
    return Target(name, "dump", lambda: GeneratedSource(name, ids, salt))


#: a guest-like mix per 1,000 pages: mostly unique, many pairs and small groups,
#: a few contents on many pages (some beyond max_page_sharing), 5% zero pages
GUEST_MIX = ((530, 1), (90, 2), (35, 3), (9, 8), (1, 40))
GUEST_ZERO = 50


def guest_mix(rng: np.random.Generator, pages: int) -> npt.NDArray[np.int64]:
    scale = pages / 1000
    mix = [(max(1, int(n * scale)), k) for n, k in GUEST_MIX] + [(2, 300)]
    return content_ids(rng, mix, zero=int(GUEST_ZERO * scale))


def grouped_pages(groups: npt.NDArray[np.int64], ids: npt.NDArray[np.int64]) -> bytes:
    """Pages whose fingerprint lines hold only ``groups`` (0: all-zero lines, a
    sparse page) and whose content is told apart by ``ids`` outside them: pages
    of one group but different ids are different contents sharing a
    fingerprint (the sketch's worst case)."""
    words = np.zeros((ids.size, PAGE_SIZE // 8), np.uint64)
    words[:, 0] = groups.astype(np.uint64)            # in the first fingerprint line
    words[:, 100] = ids.astype(np.uint64)             # in no fingerprint line
    return words.tobytes()


def adversarial_mix(rng: np.random.Generator, vms: int
                    ) -> tuple[list[npt.NDArray[np.int64]], list[npt.NDArray[np.int64]]]:
    """(groups, ids) per VM: 1,500 fingerprint groups of 4 contents, each content
    on 1 to 3 pages; 1,500 sparse contents on 2 pages; one group of 300
    contents on one page each; all spread at random over ``vms`` VMs."""
    g, i = [], []
    nid = 1
    for grp in range(1, 1501):
        for _ in range(4):
            copies = int(rng.integers(1, 4))
            g += [grp] * copies
            i += [nid] * copies
            nid += 1
    for _ in range(1500):
        g += [0, 0]
        i += [nid, nid]
        nid += 1
    g += [5000] * 300
    i += list(range(nid, nid + 300))
    order = rng.permutation(len(g))
    ga, ia = np.array(g, np.int64)[order], np.array(i, np.int64)[order]
    return np.array_split(ga, vms), np.array_split(ia, vms)
