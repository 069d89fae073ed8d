"""What-if: run the userspace KSM engine over guest memory (``scanning``: one
scan, its buffers and memory plan) and turn the result into per-VM figures
(``predict``).

May import policy (trust groups), the engine, sources, ksm, model and errors.
"""
