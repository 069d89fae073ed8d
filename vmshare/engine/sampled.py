"""The engine's counters estimated from a content-based sample, with their variance.

Pure arithmetic on page counts per content (no pages, no I/O): what kernel KSM
would report once it has converged over memory that does not change, and an
unbiased estimate of it from a sample in which each *group* of contents was
kept with probability ``p``, independently of the other groups, all of its
contents together (a keyed hash of a fingerprint the group's pages share,
under a threshold: vmshare.prediction.sketch).

The exact figure. A content held by ``n`` pages (of one trust group) ends on
``ceil(n / M)`` KSM pages, ``M`` being max_page_sharing: one of them is
pages_shared and the rest pages_sharing, so

    pages_sharing = sum over contents c of  f(n_c),   f(n) = n - ceil(n / M)

(f(1) = 0: a page alone stays unshared). Each page of c is credited the same
share f(n_c) / n_c of a page (``vmshare status``'s fair share, exact when the
content fits in one KSM page).

The estimate (Horvitz-Thompson over groups). With I_g the indicator of "group
g was sampled", P(I_g = 1) = p, independent over g, and Y_g = sum over the
contents c of g of x_c:

    S^ = (1/p) sum_g I_g Y_g                          E[S^] = S
    Var(S^) = (1-p)/p * sum_g Y_g^2
    Var^ = (1-p)/p^2 * sum_g I_g Y_g^2                E[Var^] = Var(S^)

A sampled group is known whole (every page of it was read), so Y_g is known
for each sampled g. The 95% interval is S^ +- 1.96 sqrt(Var^) (normal
approximation: the sum has many small independent terms; it fails when a few
groups carry most of the sharing, which is why all-zero pages and each VM's
groups of many pages are counted exactly apart). Any per-content quantity
estimates the same way: a VM's saving (x_c = its pages of c times
f(n_c)/n_c) and the extra saving of adding a VM to a host
(x_c = f(h_c + v_c) - f(h_c) - f(v_c)).
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


def horvitz_thompson(x: Any, rate: float, exact: float = 0.0,
                     groups: npt.NDArray[np.uint64] | None = None) -> Estimate:
    """Estimate sum_c x_c over all contents from the sampled contents' x (see the
    module docstring), plus ``exact``, a part counted without sampling.
    ``groups``: each x's group (x of one group were sampled together; None:
    each on its own)."""
    if not 0.0 < rate <= 1.0:
        raise UsageError(f"sampling rate must be in (0, 1], not {rate!r}")
    xs = np.asarray(x, dtype=np.float64)
    value = float(xs.sum()) / rate
    totals: F64 = xs
    if groups is not None and xs.size:
        _, inverse = np.unique(groups, return_inverse=True)
        totals = np.bincount(inverse.reshape(-1), weights=xs).astype(np.float64)
    var = (1.0 - rate) / rate ** 2 * float(np.square(totals).sum())
    return Estimate(value + exact, math.sqrt(var), exact, int(np.count_nonzero(xs)))


@dataclass(frozen=True)
class Member:
    """One VM's sample: ``values``/``counts`` for the contents it sampled (their
    group's decision value under the threshold: ``groups``, None when each
    content is its own group), ``heavy_values``/``heavy_counts`` for contents it
    counted exactly whatever their group's value, all-zero pages."""

    values: npt.NDArray[np.uint64]
    counts: Any
    heavy_values: npt.NDArray[np.uint64]
    heavy_counts: Any
    zero_pages: int
    groups: npt.NDArray[np.uint64] | None = None


@dataclass(frozen=True)
class Contents:
    """Several members' contents aligned: ``ids`` sorted; per content ``heavy``
    (pages counted exactly), ``full`` (heavy plus sampled pages: the true
    count for a sampled content, the heavy part otherwise) and ``group`` (its
    group's decision value where it was sampled, else its own id)."""

    ids: npt.NDArray[np.uint64]
    heavy: I64
    full: I64
    zero_pages: int
    group: npt.NDArray[np.uint64]


def contents(members: list[Member]) -> Contents:
    parts = [m.values for m in members] + [m.heavy_values for m in members]
    zero = sum(m.zero_pages for m in members)
    if not members or not sum(p.size for p in parts):
        z = np.zeros(0, np.int64)
        return Contents(np.zeros(0, np.uint64), z, z, zero, np.zeros(0, np.uint64))
    allv = np.concatenate(parts)
    ids, where = np.unique(allv, return_inverse=True)
    where = where.reshape(-1)
    n_sampled = sum(m.values.size for m in members)
    weights = np.concatenate([m.counts for m in members] + [m.heavy_counts for m in members])
    full = np.bincount(where, weights=weights.astype(np.float64), minlength=ids.size)
    heavy = np.bincount(where[n_sampled:], weights=weights[n_sampled:].astype(np.float64),
                        minlength=ids.size)
    group = ids.copy()
    group[where[:n_sampled]] = np.concatenate(
        [m.values if m.groups is None else m.groups for m in members])
    return Contents(ids, heavy.astype(np.int64), full.astype(np.int64), zero, group)


def lookup(c: Contents, ids: npt.NDArray[np.uint64]
           ) -> tuple[I64, I64, npt.NDArray[np.uint64]]:
    """(heavy, full) counts of ``ids`` in ``c`` (0 where absent) and their groups
    (their own ids where absent)."""
    if not c.ids.size:
        z = np.zeros(ids.size, np.int64)
        return z, z, ids
    pos = np.minimum(np.searchsorted(c.ids, ids), c.ids.size - 1)
    found = c.ids[pos] == ids
    return (np.where(found, c.heavy[pos], 0), np.where(found, c.full[pos], 0),
            np.where(found, c.group[pos], ids))


def _zero_saving(zero: int, m: int, use_zero_pages: bool) -> float:
    return 0.0 if use_zero_pages else float(sharing(zero, m))


def group_sharing(members: list[Member], rate: float, max_page_sharing: int,
                  use_zero_pages: bool) -> tuple[Estimate, list[Estimate]]:
    """pages_sharing of one trust group and each member's fair share of it.

    Exact part: what the heavy counts and zero pages give alone; the rest,
    f(full) - f(heavy) per content, is non-zero only for sampled contents and
    is estimated (Horvitz-Thompson), so a content on many pages adds no
    variance. With use_zero_pages all-zero pages save nothing here."""
    m = max_page_sharing
    c = contents(members)
    f_full = sharing(c.full, m).astype(np.float64)
    f_heavy = sharing(c.heavy, m).astype(np.float64)
    zsave = _zero_saving(c.zero_pages, m, use_zero_pages)
    whole = horvitz_thompson(f_full - f_heavy, rate, float(f_heavy.sum()) + zsave, c.group)
    share_full = np.divide(f_full, c.full, out=np.zeros_like(f_full), where=c.full > 0)
    share_heavy = np.divide(f_heavy, c.heavy, out=np.zeros_like(f_heavy), where=c.heavy > 0)
    per = []
    for mem in members:
        hi = np.searchsorted(c.ids, mem.heavy_values)
        si = np.searchsorted(c.ids, mem.values)
        hv = mem.heavy_counts.astype(np.float64)
        exact = float((hv * share_heavy[hi]).sum())
        delta = np.concatenate([hv * (share_full[hi] - share_heavy[hi]),
                                mem.counts.astype(np.float64) * share_full[si]])
        zpart = zsave * mem.zero_pages / c.zero_pages if c.zero_pages else 0.0
        groups = np.concatenate([c.group[hi], c.group[si]])
        per.append(horvitz_thompson(delta, rate, exact + zpart, groups))
    return whole, per


def _gain(h: Any, v: Any, m: int) -> Any:
    return sharing(h + v, m) - sharing(h, m) - sharing(v, m)


def extra_sharing(host: Contents, vm: Contents, rate: float, max_page_sharing: int,
                  use_zero_pages: bool) -> Estimate:
    """Pages a VM would add to pages_sharing by joining a host's group, beyond
    what it shares with itself alone: sum_c f(h_c + v_c) - f(h_c) - f(v_c);
    exact over heavy counts, sampled for the rest (as group_sharing)."""
    m = max_page_sharing
    h_heavy, h_full, h_group = lookup(host, vm.ids)
    exact_part = _gain(h_heavy, vm.heavy, m).astype(np.float64)
    delta = _gain(h_full, vm.full, m).astype(np.float64) - exact_part
    z = 0.0
    if not use_zero_pages:
        z = float(_gain(host.zero_pages, vm.zero_pages, m))
    groups = np.where(vm.full > vm.heavy, vm.group, h_group)     # where it was sampled
    return horvitz_thompson(delta, rate, float(exact_part.sum()) + z, groups)
