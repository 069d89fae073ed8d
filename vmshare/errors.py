"""The exception tree. Every error vmshare raises derives from VmshareError.

str(error) is one line an operator can act on; the CLI prints exactly that and
exits non-zero. Adapters map foreign exceptions (OSError, libvirtError, QMP
errors) to these at their boundary and chain the cause with ``raise ... from``.
"""

from __future__ import annotations


class VmshareError(Exception):
    """Root of every vmshare error. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(VmshareError):
    """The user asked for something malformed (bad argument, bad value)."""

    exit_code = 2


class KsmUnavailable(VmshareError):
    """The kernel has no KSM (no /sys/kernel/mm/ksm) or it cannot be read."""


class KnobError(VmshareError):
    """A KSM knob is unknown, read-only, out of range, refused, or read back wrong."""


class AccessDenied(VmshareError):
    """The operation needs privileges we do not have (EPERM/EACCES)."""


class ProcessGone(VmshareError):
    """A process vanished (ESRCH/ENOENT under /proc) or its pid was reused."""


class ProcfsError(VmshareError):
    """A /proc file could not be read or parsed."""


class HypervisorError(VmshareError):
    """libvirt or QEMU refused, failed, or is unreachable."""


class DomainNotFound(HypervisorError):
    """No domain with that name, UUID or id."""


class DomainNotRunning(HypervisorError):
    """The domain exists but has no running QEMU process."""


class DeadlineExceeded(HypervisorError):
    """A libvirt or QMP call did not answer within its deadline."""


class MonitorError(HypervisorError):
    """A QMP command failed. Keeps what was sent and what came back."""

    def __init__(self, message: str, *, command: str = "", arguments: object = None,
                 response: object = None) -> None:
        super().__init__(message)
        self.command = command
        self.arguments = arguments
        self.response = response


class VerificationError(VmshareError):
    """After acting, the observed state differs from what was asked for."""


class UnmergeRefused(VmshareError):
    """Unmerging would need more memory than is available (OOM risk)."""


class PolicyError(VmshareError):
    """A policy file or per-domain policy is invalid, or policy forbids the action."""


class TrustGroupConflict(PolicyError):
    """Making a VM mergeable would let it share pages with a VM of another trust group."""


class DumpError(VmshareError):
    """A guest memory dump is malformed, truncated, or uses an unsupported feature."""


class ImageBuildError(VmshareError):
    """The demo/test guest image could not be built."""


class PrometheusError(VmshareError):
    """The Prometheus HTTP API is unreachable, too slow, or answered something
    that is not a Prometheus API reply (or an error reply)."""


class SketchError(VmshareError):
    """A content sketch file or its key is unusable: wrong magic or version, corrupt,
    truncated, made with another key or rate, stale, or unsafe to keep or read."""
