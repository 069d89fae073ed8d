"""Names of the libvirt domains integration tests create, and their teardown.

Test sessions run concurrently on one libvirtd. A fixed name let one run's
teardown destroy another run's guest (and a name recorded before createXML
failed because the name was taken destroyed the other run's domain at once).
So every test domain is named ``vmshare-it-<tag>-<run id>`` (the run id is
random per pytest process, tests.hostguard.RUN_ID) and is torn down by the
UUID that createXML/defineXML returned, never by name.
"""

from __future__ import annotations

import subprocess

from tests.hostguard import RUN_ID

IT_DOMAIN_PREFIX = "vmshare-it-"
LIBVIRT_URI = "qemu:///system"


def domain_name(tag: str) -> str:
    """This run's name for the test domain ``tag``."""
    return f"{IT_DOMAIN_PREFIX}{tag}-{RUN_ID}"


def destroy_by_uuid(uuid: str, *, undefine: bool = False) -> None:
    """Destroy (and with ``undefine`` also undefine) one domain on a fresh
    connection: the session's libvirt connection dies when libvirtd restarts,
    and a restored guest is a new libvirt object with the same UUID."""
    subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, "destroy", uuid],
                   capture_output=True, timeout=60, check=False)
    if undefine:
        subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, "undefine", uuid],
                       capture_output=True, timeout=60, check=False)
