"""The libvirt qemu hook's installation (``install``: a qemu.d drop-in, status,
uninstall) and libvirtd discovery and restart (``libvirtd``). The hook script
itself is ``hooks/vmshare-qemu-hook`` (standard library only).

May import ksm (procfs), errors and model.
"""
