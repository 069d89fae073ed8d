"""Each fake against the Protocol of the seam it stands in for.

Never called: mypy runs over tests/fakes/ in the test command
(integration/test.sh), and a fake that drifts from its Protocol fails there,
at type-checking, instead of passing tests that no longer mirror the real
adapter.
"""

from __future__ import annotations

from tests.fakes.hypervisor import FakeHypervisor
from vmshare.hypervisor.base import Hypervisor


def as_hypervisor(fake: FakeHypervisor) -> Hypervisor:
    return fake
