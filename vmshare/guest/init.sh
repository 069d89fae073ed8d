#!/bin/sh
# /init of the vmshare test guest (busybox sh, PID 1).
# Reads vmshare.{identical,unique,zero,volatile}=MiB and vmshare.seed=N from the
# kernel command line and runs /bin/fill, which prints the ready line on the
# console and never returns. PID 1 must not exit (the kernel would panic), so
# a failed fill is reported on the console and the guest powers itself off.
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

identical=0
unique=0
zero=0
volatile=0
seed=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmshare.identical=*) identical="${arg#*=}" ;;
        vmshare.unique=*) unique="${arg#*=}" ;;
        vmshare.zero=*) zero="${arg#*=}" ;;
        vmshare.volatile=*) volatile="${arg#*=}" ;;
        vmshare.seed=*) seed="${arg#*=}" ;;
    esac
done

/bin/fill "$identical" "$unique" "$zero" "$volatile" "$seed"
echo "vmshare-fill: error fill exited with status $?"
sync
poweroff -f
# poweroff -f does not return; if it somehow does, stay alive rather than panic.
while :; do sleep 3600; done
