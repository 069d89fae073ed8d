#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root, no systemd needed) for vmshare and its
# integration tests: Debian packages, the project venv, the vmshare(1) man page
# and bash/zsh completion, virtlogd + libvirtd, and the cached test guest
# image. Idempotent; quiet and fast (< 3 s) when everything is already in
# place. Run from anywhere.
#
# Guests are always TCG (libvirt domain type 'qemu', QEMU -accel tcg): /dev/kvm
# may open on these machines but KVM guests hang, so nothing here enables KVM.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.vmshare-pyproject.sha256"
LIBVIRT_URI="qemu:///system"
DAEMON_DEADLINE=30
PACKAGES=(qemu-system-x86 libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
          busybox-static linux-image-cloud-amd64 cpio python3-venv python3-dev gcc libc6-dev
          libxxhash-dev procps man-db bash-completion zsh)
# the fleet tests: a real Prometheus (and promtool); the real logrotate for the audit log
FLEET_PACKAGES=(prometheus logrotate)
# the real Debian guest (vmshare/guest/debian.py): a root made from Debian's packages
GUEST_PACKAGES=(mmdebstrap qemu-utils e2fsprogs)
# `systemd-analyze verify` on the unit (integration/test_unit_file.py); the
# machine needs no systemd as PID 1 for it
UNIT_PACKAGES=(systemd)
PACKAGES+=("${FLEET_PACKAGES[@]}" "${GUEST_PACKAGES[@]}" "${UNIT_PACKAGES[@]}")

say() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

# The Debian package: build, lint, and the throwaway root it is installed into
# (integration/build_deb.sh, integration/test_package.py).
PACKAGING_PACKAGES=(dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all-dev
                    python3-setuptools python3-libvirt python3-numpy python3-xxhash
                    python3-prometheus-client lintian
                    mmdebstrap util-linux)

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, starts libvirtd)"
[[ -f $REPO/pyproject.toml ]] || die "no pyproject.toml in $REPO"

# --- Debian packages -------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}" "${PACKAGING_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    apt-get update >"$log" 2>&1 || { cat "$log" >&2; die "apt-get update failed"; }
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" "${PACKAGING_PACKAGES[@]}" \
        >"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; die "apt-get install ${missing[*]} failed"; }
    rm -f "$log"
fi

# --- VictoriaMetrics: the fleet tests' second server of Prometheus's API ----
# Debian's package, its server binary unpacked into the test cache rather than
# installed: installing would add a service (started on :8428 on a systemd host).
VICTORIA_DIR=${VMSHARE_CACHE:-/var/cache/vmshare-test}/victoria-metrics
if [[ ! -x $VICTORIA_DIR/usr/bin/victoria-metrics ]]; then
    say "unpacking Debian's victoria-metrics into $VICTORIA_DIR"
    dl=$(mktemp -d)
    log=$(mktemp)
    fetch_victoria() { (cd "$dl" && apt-get download victoria-metrics) >>"$log" 2>&1; }
    if ! fetch_victoria; then    # no package lists yet on a machine set up before
        apt-get update >>"$log" 2>&1 && fetch_victoria \
            || { tail -n 20 "$log" >&2; rm -rf "$dl" "$log"; die "apt-get download victoria-metrics failed"; }
    fi
    rm -rf "$VICTORIA_DIR.new"
    mkdir -p "$VICTORIA_DIR.new"
    dpkg-deb --fsys-tarfile "$dl"/victoria-metrics_*.deb \
        | tar -x -C "$VICTORIA_DIR.new" ./usr/bin/victoria-metrics \
        || { rm -rf "$dl" "$log" "$VICTORIA_DIR.new"; die "unpacking victoria-metrics failed"; }
    rm -rf "$VICTORIA_DIR"
    mv "$VICTORIA_DIR.new" "$VICTORIA_DIR"
    rm -rf "$dl" "$log"
fi

# --- Python venv -----------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV"
    /usr/bin/python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
fi
# the install is redone when the build inputs change or the C extension is missing
want=$(cat "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO/vmshare/engine/_pages.c" \
       "$REPO/vmshare/sources/_readpages.c" | sha256sum | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [[ $want != "$have" ]] || ! compgen -G "$REPO/vmshare/engine/_pages.*.so" >/dev/null \
        || ! compgen -G "$REPO/vmshare/sources/_readpages.*.so" >/dev/null; then
    say "pip install -e $REPO[test]"
    log=$(mktemp)
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[test]" \
        >"$log" 2>&1 || { tail -n 30 "$log" >&2; die "pip install -e $REPO[test] failed"; }
    rm -f "$log"
    echo "$want" > "$STAMP"
fi

# --- Man page and shell completion, generated from vmshare's parser ---------
# Regenerated only when a source file changed or an installed copy differs from
# what this checkout installed last (another checkout may have replaced it).
MAN_PAGE=/usr/local/share/man/man1/vmshare.1
BASH_COMPLETION=/usr/share/bash-completion/completions/vmshare
ZSH_COMPLETION=/usr/local/share/zsh/site-functions/_vmshare
DOCS_STAMP="$VENV/.vmshare-docs.sha256"
docs_state() {
    find "$REPO/vmshare" -name '*.py' -print0 | sort -z | xargs -0 cat | sha256sum | cut -d' ' -f1
    cat "$MAN_PAGE" "$BASH_COMPLETION" "$ZSH_COMPLETION" 2>/dev/null | sha256sum | cut -d' ' -f1
}
if [[ $(docs_state) != "$(cat "$DOCS_STAMP" 2>/dev/null || true)" ]]; then
    say "installing $MAN_PAGE and bash/zsh completion"
    gen=$(mktemp -d)
    (cd "$REPO" && "$VENV/bin/python" -m vmshare.cli.manpage --out "$gen/vmshare.1" \
        && "$VENV/bin/python" -m vmshare.cli.completion bash > "$gen/vmshare.bash" \
        && "$VENV/bin/python" -m vmshare.cli.completion zsh > "$gen/_vmshare") \
        || { rm -rf "$gen"; die "generating the man page and completion failed"; }
    install -D -m 0644 "$gen/vmshare.1" "$MAN_PAGE"
    install -D -m 0644 "$gen/vmshare.bash" "$BASH_COMPLETION"
    install -D -m 0644 "$gen/_vmshare" "$ZSH_COMPLETION"
    rm -rf "$gen"
    mandb -q /usr/local/share/man 2>/dev/null || true   # man finds the page without it too
    docs_state > "$DOCS_STAMP"
fi

# --- Daemons (no systemd: start them by hand) ------------------------------
running() {   # running NAME PIDFILE
    local pid
    pid=$(cat "$2" 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]; then
        return 0
    fi
    pgrep -x "$1" >/dev/null
}
if ! running virtlogd /run/virtlogd.pid; then
    say "starting virtlogd"
    virtlogd -d || die "virtlogd -d failed"
fi
if ! running libvirtd /run/libvirtd.pid; then
    say "starting libvirtd"
    libvirtd -d || die "libvirtd -d failed"
fi
deadline=$((SECONDS + DAEMON_DEADLINE))
until err=$(timeout 10 virsh -q -c "$LIBVIRT_URI" version 2>&1 >/dev/null); do
    ((SECONDS < deadline)) || die "libvirtd does not answer on $LIBVIRT_URI after ${DAEMON_DEADLINE} s: $err"
    sleep 0.2
done

# Guests are TCG only (domain type 'qemu'); make sure libvirt offers it for x86_64/pc.
caps=$(virsh -q -c "$LIBVIRT_URI" domcapabilities --virttype qemu --arch x86_64 \
       --machine pc 2>&1 || true)
[[ $caps == *"<domain>qemu</domain>"* ]] \
    || die "libvirt offers no TCG (type 'qemu') x86_64 pc domains: is qemu-system-x86 installed?"

# --- Guest image (cached; rebuilt only when an input changed) --------------
image=$(cd "$REPO" && "$VENV/bin/python" -c \
    'from vmshare.guest import build_image; print(build_image().initrd.parent)') \
    || die "building the guest image failed"
[[ -n ${VMSHARE_SETUP_VERBOSE:-} ]] && say "guest image in $image"
debian=$(cd "$REPO" && "$VENV/bin/python" -c \
    'from vmshare.guest.debian import build_debian_image; print(build_debian_image().root)') \
    || die "building the Debian guest image failed"
[[ -n ${VMSHARE_SETUP_VERBOSE:-} ]] && say "Debian guest root disk $debian"
say "ok"
