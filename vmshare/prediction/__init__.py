"""What-if: run the userspace KSM engine over guest memory (``targets``: what
to scan and its trust groups; ``scanning``: one scan through its bounded
read buffer) and turn the result into per-VM
figures (``predict``).

May import policy (trust groups), the engine, sources, ksm, model and errors.
"""
