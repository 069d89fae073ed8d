"""vmshare: per-VM KSM control and exact per-VM memory-sharing accounting."""

__version__ = "0.1.0"
PAGE_SIZE = 4096
