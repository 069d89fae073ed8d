"""The engine's counters estimated from a content-based sample, with their variance.

Pure arithmetic on page counts per content (no pages, no I/O): what kernel KSM
would report once it has converged over memory that does not change, and an
unbiased estimate of it from a sample in which every distinct content was kept
with probability ``p``, independently of the others (a keyed hash of the
content under a threshold: vmshare.prediction.sketch).

The exact figure. A content held by ``n`` pages (of one trust group) ends on
``ceil(n / M)`` KSM pages, ``M`` being max_page_sharing: one of them is
pages_shared and the rest pages_sharing, so

    pages_sharing = sum over contents c of  f(n_c),   f(n) = n - ceil(n / M)

(f(1) = 0: a page alone stays unshared). Each page of c is credited the same
share f(n_c) / n_c of a page (``vmshare status``'s fair share, exact when the
content fits in one KSM page).

The estimate (Horvitz-Thompson). With indicator I_c of "c was sampled",
P(I_c = 1) = p, independent over c:

    S^ = (1/p) sum_c I_c f(n_c)                       E[S^] = S
    Var(S^) = (1-p)/p * sum_c f(n_c)^2
    Var^ = (1-p)/p^2 * sum_c I_c f(n_c)^2             E[Var^] = Var(S^)

and the 95% interval is S^ +- 1.96 sqrt(Var^) (normal approximation: the sum
has many small independent terms; it fails when a few contents carry most of
the sharing, which is why all-zero pages, the one content every guest has many
of, are counted exactly apart). Any per-content quantity estimates the same
way: a VM's saving (x_c = its pages of c times f(n_c)/n_c) and the extra
saving of adding a VM to a host (x_c = f(h_c + v_c) - f(h_c) - f(v_c)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vmshare.errors import UsageError

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
#: two-sided 95% normal quantile
Z95 = 1.959963984540054


def sharing(n: Any, max_page_sharing: int) -> Any:
    """pages_sharing of a content held by ``n`` pages (array or int), once merged."""
    if max_page_sharing < 2:
        raise UsageError(f"max_page_sharing must be >= 2, not {max_page_sharing}")
    n = np.asarray(n, dtype=np.int64)
    return np.where(n > 0, n - (n + max_page_sharing - 1) // max_page_sharing, 0)


@dataclass(frozen=True)
class Estimate:
    """A sampled estimate: ``value`` (pages), its estimated standard error and
    95% interval; ``exact`` of it was counted exactly (zero pages)."""

    value: float
    stderr: float
    exact: float = 0.0
    samples: int = 0           # sampled contents that contributed

    @property
    def low(self) -> float:
        return max(self.exact, self.value - Z95 * self.stderr)

    @property
    def high(self) -> float:
        return self.value + Z95 * self.stderr

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.value + other.value, math.hypot(self.stderr, other.stderr),
                        self.exact + other.exact, self.samples + other.samples)


def horvitz_thompson(x: Any, rate: float, exact: float = 0.0) -> Estimate:
    """Estimate sum_c x_c over all contents from the sampled contents' x (see the
    module docstring), plus ``exact``, a part counted without sampling."""
    if not 0.0 < rate <= 1.0:
        raise UsageError(f"sampling rate must be in (0, 1], not {rate!r}")
    xs = np.asarray(x, dtype=np.float64)
    value = float(xs.sum()) / rate
    var = (1.0 - rate) / rate ** 2 * float(np.square(xs).sum())
    return Estimate(value + exact, math.sqrt(var), exact, int(np.count_nonzero(xs)))


def combine(hashes: list[npt.NDArray[np.uint64]], counts: list[I64]
            ) -> tuple[npt.NDArray[np.uint64], I64, I64]:
    """Contents of several samples: (content ids, total pages per content, and
    for each input row its content's index), the ids sorted."""
    if not hashes:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    allh = np.concatenate(hashes)
    allc = np.concatenate(counts).astype(np.int64)
    ids, where = np.unique(allh, return_inverse=True)
    total = np.zeros(ids.size, np.int64)
    np.add.at(total, where, allc)
    return ids, total, where.astype(np.int64)


def group_sharing(counts: list[I64], hashes: list[npt.NDArray[np.uint64]],
                  zero_pages: list[int], rate: float, max_page_sharing: int,
                  use_zero_pages: bool) -> tuple[Estimate, list[Estimate]]:
    """pages_sharing of one trust group and each member's fair share of it, from
    the members' samples (same key, same rate) and their exact zero-page counts.
    With use_zero_pages all-zero pages map the zero page and save nothing here."""
    _, total, where = combine(hashes, counts)
    f = sharing(total, max_page_sharing).astype(np.float64)
    ztotal = sum(zero_pages)
    zsave = 0.0 if use_zero_pages else float(sharing(ztotal, max_page_sharing))
    whole = horvitz_thompson(f, rate, zsave)
    per: list[Estimate] = []
    start = 0
    share = np.divide(f, total, out=np.zeros_like(f), where=total > 0)
    for c, z in zip(counts, zero_pages, strict=True):
        idx = where[start:start + c.size]
        start += c.size
        zpart = zsave * z / ztotal if ztotal else 0.0
        per.append(horvitz_thompson(c.astype(np.float64) * share[idx], rate, zpart))
    return whole, per


def extra_sharing(host: tuple[npt.NDArray[np.uint64], I64], vm: tuple[npt.NDArray[np.uint64], I64],
                  host_zero: int, vm_zero: int, rate: float, max_page_sharing: int,
                  use_zero_pages: bool) -> Estimate:
    """Pages a VM would add to pages_sharing by joining a host's group, beyond
    what it shares with itself alone: sum_c f(h_c + v_c) - f(h_c) - f(v_c)."""
    hh, hc = host
    vh, vc = vm
    pos = np.searchsorted(hh, vh)
    pos_ok = np.minimum(pos, max(hh.size - 1, 0))
    found = (pos < hh.size) & (hh[pos_ok] == vh) if hh.size else np.zeros(vh.size, bool)
    h = np.where(found, hc[pos_ok] if hh.size else 0, 0).astype(np.int64)
    v = vc.astype(np.int64)
    m = max_page_sharing
    d = (sharing(h + v, m) - sharing(h, m) - sharing(v, m)).astype(np.float64)
    z = 0.0
    if not use_zero_pages:
        z = float(sharing(host_zero + vm_zero, m) - sharing(host_zero, m) - sharing(vm_zero, m))
    return horvitz_thompson(d, rate, z)
