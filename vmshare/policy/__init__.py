"""Decide which VMs' RAM should be mergeable: ``rules`` (pure precedence and
trust-group planning) and ``sources`` (collecting each VM's policy, facts and
current merge state for the rules).

May import observe, the hypervisor seam, config, model and errors.
"""
