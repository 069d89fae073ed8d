"""Peak memory of a whole prediction over 1 GiB of a live process, measured
(the peak RSS, VmHWM = ru_maxrss, of a fresh subprocess; not a timing): the
read buffer, one batch of pages read again, 16 bytes a page and a fixed
allowance, whatever the size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.page_mix import expected_sharing, mix_process
from vmshare.engine.state import FETCH_PAGES
from vmshare.model import PAGE_SIZE
from vmshare.prediction.scanning import DEFAULT_BUFFER_BYTES

PAGES = 2**30 // PAGE_SIZE
#: what the scanning process holds beyond its buffers and per-page state:
#: the store of representatives (8 MiB on this mix), thread stacks, numpy
#: temporaries of bounded batches, malloc slack, code pages faulted in
#: (benchmarks/engine_scaling.py measures the per-page part alone:
#: 17.3-17.7 B/page); a copy of the guest would add 1 GiB
ALLOWANCE = 32 * 2**20
BYTES_PER_PAGE = 16

SCANNER = r"""
import json, sys
from vmshare.engine import EngineConfig
from vmshare.ksm.procfs import ProcFs
from vmshare.prediction.predict import pid_target, predict

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

target = pid_target(int(sys.argv[1]), ProcFs())
# the peak RSS a child inherits from its parent's memory map at fork (it
# survives exec) is reset, so the peak is this process's own
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
result = predict([target], EngineConfig())
print(json.dumps({"base": base, "peak": status("VmHWM"),
                  "sharing": result.totals()["pages_sharing"],
                  "pages": result.groups[0].sources[0].pages}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
def test_predicting_1_gib_stays_within_the_buffer_and_16_bytes_a_page() -> None:
    with mix_process(PAGES) as (pid, _):
        out = subprocess.run([sys.executable, "-c", SCANNER, str(pid)],
                             capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert r["pages"] >= PAGES            # and the rest of its anonymous memory
    assert r["sharing"] >= expected_sharing(PAGES) * 0.97       # it did merge
    extra = r["peak"] - r["base"]
    budget = DEFAULT_BUFFER_BYTES + FETCH_PAGES * PAGE_SIZE + BYTES_PER_PAGE * PAGES + ALLOWANCE
    assert extra <= budget, (f"{extra / 2**20:.1f} MiB over the imports' "
                             f"{r['base'] / 2**20:.1f} MiB; budget {budget / 2**20:.1f} MiB")
