"""What-if: run the userspace KSM engine over guest memory (``targets``: what
to scan and its trust groups; ``planning``: the memory a scan may hold;
``scanning``: one scan and its buffers) and turn the result into per-VM
figures (``predict``).

May import policy (trust groups), the engine, sources, ksm, model and errors.
"""
