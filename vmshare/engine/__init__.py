"""The userspace KSM engine: the kernel's merge algorithm over pages handed to it.

Overview of the algorithm (as mm/ksm.c, kernel 6.9+ ordering in cmp_and_merge_page)
-------------------------------------------------------------------------------------
A full scan visits every page of every source once, in scan order: sources in
the order given to ``begin_scan``, regions in their listed order, pages by index
(the kernel: mm_slot list order, then address order). For each page:

1. A page mapped to a stable node (a merged, write-protected KSM page) whose
   content is unchanged stays where it is. A merged page whose content changed
   was broken out by copy-on-write: its mapping leaves the node when the scan
   reaches it (``remove_rmap_item_from_tree``) and the page is treated like any
   other private page from then on.
2. Any other page has its checksum compared with the one recorded at the
   previous scan. If it changed (or the page is new), the page is *volatile*:
   the new checksum is remembered and nothing else happens. Merging therefore
   needs at least two scans.
3. With ``use_zero_pages`` an all-zero page is now mapped to the zero page. It
   counts in ``ksm_zero_pages``, never in pages_shared/pages_sharing; its rmap
   item lives (and counts as volatile) until the next scan passes it.
4. The stable tree is searched: a byte-identical stable node with fewer than
   ``max_page_sharing`` mappings takes the page (among several dups of a chain
   the fullest one that still has room, as the kernel's chain pruning picks).
5. Otherwise the unstable tree of this scan is searched: a byte-identical page
   found there is merged with this one into a new stable node; with an existing
   stable node of that content (all full) the new node is a dup in a chain
   (``stable_node_chains`` / ``stable_node_dups``). Not found: the page is
   inserted (``pages_unshared``). The unstable tree is rebuilt every scan.

The kernel's counters follow: pages_shared is the number of stable nodes with a
mapping, pages_sharing the mappings beyond the first, pages_volatile the rmap
items in neither tree. Meanings: ``vmshare.model.COUNTER_MEANINGS``.

Snapshots, not page tables: the rules beyond the kernel's own:

* A page's content is what was fed; a write is assumed to happen just before
  the scan reaches the page. A page of a stable node stays mapped to it while
  its bytes equal the node's; otherwise it was broken out by CoW and leaves
  the node at its position in the scan.
* A stable node none of whose pages is present with its content this scan
  has no mapping left: its KSM page is freed before the scan (the kernel
  finds it stale on first lookup). Its content is then unknown to the engine,
  which is why no page bytes are needed between scans.
* Pages not fed this scan (holes) leave at their position, as the kernel frees
  their rmap items when its cursor passes them. Sources and regions no longer
  listed, and regions whose generation or size changed, are dropped at the
  start of the scan, as if unmapped.
* A page stays on its stable node while its checksum is unchanged (or, in
  verify mode, while its bytes still match the node); every new merge is
  decided by a byte-for-byte comparison. See "Trust and verification" in
  the package overview.
* Chains are pruned at the end of each scan (the kernel does it every
  stable_node_chains_prune_millisecs): a chain left with one dup that has
  room reverts to a plain stable node.

Representation (not the kernel's rbtrees): per-page state lives in numpy arrays
(checksum uint64, stable node int32, flags uint8: 13 bytes a page); per stable
node a count, a chain id and a 128-bit fingerprint (24 bytes a node). A scan is
vectorised per region and per checksum bucket (``vmshare.engine.merge``; a
page alone in the unstable tree whose checksum held goes back there with no
sort, ``vmshare.engine.lone``); only
groups that meet an existing stable node, lose a member in the same scan, or
hold a checksum collision are simulated page by page (``vmshare.engine.slowpath``).
The work done once per page (xxh3 hashing, memcmp, the zero test) is in a small
C extension, ``vmshare.engine._pages``, with the GIL released; Python decides
everything.

Trust and verification (what is compared with what):

* Index: pages are grouped by their xxh3_64 checksum; equal checksums are only
  ever a reason to look, never a reason to merge.
* Every NEW merge is byte-for-byte: pages forming a stable node are compared
  with the first page of their checksum group, and a page joining an existing
  node is compared with a page of that node present (and kept) in this scan.
  So a hash collision never merges different pages.
* Compared while fed (``begin_scan(store_pages=N)``, ``vmshare.engine.feedcheck``):
  an arrival is compared with the zero page, or byte for byte with a copy of
  the first page of its checksum group fed this scan (a store of at most N
  copies, for the checksums that repeated at the previous scan), while its
  bytes are at hand. End of scan: each copy's page is read again and must
  still have the copy's xxh3_128; a group with a mismatch, a copy that
  changed or no copy is read again and compared as below. A page is then
  compared by its bytes as fed (ksmd compares a page when its cursor reaches
  it), not as they are at the end of the scan.
* A node's fingerprint is xxh3_128 of the verified bytes it was created from.
  Before pages join an existing node (slow path), the kept page used as the
  node's representative is checked against that fingerprint; a node failing
  the check takes no new page. The representative's identity with the node's
  original content thus rests on a 128-bit equality, its identity with the
  joining page on real bytes.
* Retention (fast path, the default hasher): the kernel keeps a merged page
  merged until it is written (CoW), which a snapshot cannot see; the engine
  keeps a page on its node while its xxh3_64 checksum is unchanged since the
  previous scan, without reading its bytes again. A rewrite to different bytes
  with the same xxh3_64 (probability ~2**-64 per rewrite) would wrongly stay
  merged; it could not pull any other page in (see the point above).
* Retention (verify mode: ``KsmEngine(verify_merged=True)``, and always when a
  custom hasher is injected, e.g. tests forcing collisions): each kept page's
  xxh3_128 must equal its node's fingerprint and its bytes must equal the
  node's representative's; zero-mapped pages must still be all zero. Costs a
  128-bit hash and a compare per merged page each scan.

Page bytes: the engine copies none. It keeps references to the buffers of the
current scan's runs until ``end_scan`` returns (byte comparisons happen there)
and holds no page bytes between scans. A run fed with ``retain=False`` is only
hashed; the pages of it the scan must compare are asked of ``end_scan``'s
``fetch`` (at most ``state.FETCH_PAGES`` at a time) and compared as they are
then, as ksmd compares a page when it reaches it; with a store (above) only
the store's representatives and the groups it could not decide are asked
for, and the store holds at most N page copies during the scan. Verify mode needs every
merged page each scan, so it takes retained runs only.

Hashed elsewhere: ``checksums(data)`` and ``zeros_hold(data, checksums)`` read
no engine state, so the thread that read a run hashes it and checks its
zero-checksum pages (``feed(run, checksums=..., zeros_checked=...)``). While
``needs_bytes`` is False (a first scan: no page can arrive, nothing is
compared) ``feed_checksums`` takes a run's checksums without its bytes.

Incremental feeds: ``feed(run, unchanged)`` takes a per-page mask from a source
that knows which pages were not written since the previous scan (such as the
kernel's soft-dirty bits; no source gives one today). Those pages keep the
checksum recorded then instead of being hashed again; their bytes must still
be in the run, since any new merge is byte-compared as above. This matches
the kernel's own rule that a merged page stays merged until it is written.
"""

from vmshare.engine.core import KsmEngine
from vmshare.engine.counters import EngineConfig, KsmCounters, ScanResult
from vmshare.engine.hashing import default_hasher
from vmshare.engine.results import SourceSavings

__all__ = [
    "EngineConfig",
    "KsmCounters",
    "KsmEngine",
    "ScanResult",
    "SourceSavings",
    "default_hasher",
]
