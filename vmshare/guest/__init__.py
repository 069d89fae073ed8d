"""The test/demo guest: a Debian cloud kernel and an initramfs whose memory content is known.

``build_image`` makes (or reuses) the image; ``domain_xml`` and ``qemu_argv``
boot it under libvirt or plain QEMU (always TCG); ``wait_ready`` waits for
the guest's fill program to report that its regions are written. The page
contents are reproducible on the host with ``vmshare.guest.pattern``.
"""

from vmshare.guest.builder import DEFAULT_CACHE_DIR, GuestImage, build_image, find_kernel
from vmshare.guest.launch import (
    READY_PREFIX,
    FillSpec,
    GuestBootFailed,
    GuestBootTimeout,
    domain_xml,
    kernel_cmdline,
    qemu_argv,
    wait_ready,
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "READY_PREFIX",
    "FillSpec",
    "GuestBootFailed",
    "GuestBootTimeout",
    "GuestImage",
    "build_image",
    "domain_xml",
    "find_kernel",
    "kernel_cmdline",
    "qemu_argv",
    "wait_ready",
]
