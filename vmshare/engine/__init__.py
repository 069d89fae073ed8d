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

Representation (not the kernel's rbtrees): per-page state lives in numpy arrays
(checksum, stable node index, flags: 13 bytes a page); a scan groups pages by
their xxh3 checksum with a sort, and within a group separates contents by
byte-for-byte comparison, so a hash collision never merges different pages.
Content groups never interact, so each is simulated in scan order on its own.

Page bytes: the engine copies none. It keeps references to the buffers of the
current scan's runs until ``end_scan`` returns and holds no page bytes between
scans; a stable node is identified across scans by its checksum and the bytes of
its pages present in the scan (see ``KsmEngine`` for the exact rules).
"""

from vmshare.engine.core import (
    EngineConfig,
    KsmCounters,
    KsmEngine,
    ScanResult,
    SourceSavings,
    default_hasher,
)

__all__ = [
    "EngineConfig",
    "KsmCounters",
    "KsmEngine",
    "ScanResult",
    "SourceSavings",
    "default_hasher",
]
