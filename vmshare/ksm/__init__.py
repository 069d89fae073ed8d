"""The adapter to kernel KSM and the process views KSM needs: ``sysfs`` (the
/sys/kernel/mm/ksm knobs and counters, validated and read back) and ``procfs``
(ksm_stat, smaps, pagemap, kpageflags, kpagecount, meminfo): the only code
that opens /proc and /sys.

May import model and errors only.
"""
