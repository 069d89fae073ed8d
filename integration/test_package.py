"""The Debian package as an operator gets it: built, linted, installed, used, purged.

One module-scoped build (integration/build_deb.sh, outside the checkout) and
one throwaway Debian 12 root made with mmdebstrap. The root holds only what
the .deb's Depends name, plus man-db for `man vmshare`, so the package must
work with exactly Debian's packages; it is cached as a tarball in
/var/cache/vmshare-test keyed by that list, and unpacked afresh each run.

Commands run with `chroot` in a private mount namespace that gives the root
/proc, /dev and a read-only bind of the host's /sys: `vmshare ksm show` then
reads the real kernel KSM state (and nothing in the root can change it), while
no libvirtd socket exists there, so `vmshare status` must fail with vmshare's
one-line error. The package is installed with `apt-get install ./DEB`
(without Recommends: libvirt-daemon-system and QEMU would start nothing in a
chroot) and finally purged: nothing it installed or made may be left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.daemon_helpers import systemd_verify

# a cold run makes the root with mmdebstrap inside the first test's time
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VMSHARE_CACHE", "/var/cache/vmshare-test"))
SUITE = "bookworm"
VARIANT = "apt"
EXTRA_PACKAGES = ("man-db",)
SETUP_HINT = "run integration/setup.sh"
# state the daemon makes at run time; the purge must take it too (postrm)
RUNTIME_FILES = ("/var/log/vmshare/audit.jsonl", "/var/lib/vmshare/state.json")
CONFFILES = {"/etc/vmshare/vmshare.toml", "/etc/libvirt/hooks/qemu.d/vmshare",
             "/etc/logrotate.d/vmshare"}
# what apt and dpkg change in any install and purge, not the package's own
VOLATILE = ("/var/lib/dpkg/", "/var/lib/apt/", "/var/cache/", "/var/log/apt/",
            "/var/log/dpkg.log", "/var/log/alternatives.log", "/tmp/", "/etc/ld.so.cache")
MOUNT_AND_CHROOT = r"""
root=$1; shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount -o remount,bind,ro "$root/sys"
exec chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    TERM=dumb "$@"
"""


@dataclass(frozen=True)
class Chroot:
    root: Path

    def run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the root; the mounts vanish with the namespace."""
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-euc",
             MOUNT_AND_CHROOT, "sh", str(self.root), *cmd],
            capture_output=True, text=True, timeout=timeout, check=False)

    def ok(self, *cmd: str, timeout: float = 120) -> str:
        r = self.run(*cmd, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(cmd)}: exit {r.returncode}\n{r.stderr}{r.stdout}"
        return r.stdout

    def paths(self) -> set[str]:
        """Every path in the root but the kernel's file systems and apt/dpkg's own."""
        found = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            rel = "/" if rel == "." else "/" + rel
            if rel in ("/proc", "/sys", "/dev", "/run"):
                dirnames[:] = []
                continue
            for name in dirnames + filenames:
                p = rel.rstrip("/") + "/" + name
                if not any(p.startswith(v) or p + "/" == v for v in VOLATILE):
                    found.add(p)
        return found


@dataclass(frozen=True)
class Installed:
    deb: Path
    lintian: str
    chroot: Chroot
    before: frozenset[str]      # the root's paths before the install
    owned: tuple[str, ...]      # dpkg -L vmshare, once installed
    conffiles: frozenset[str]


def depends_of(deb: Path) -> list[str]:
    """The package names of the .deb's Depends (first of each alternative)."""
    field = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                           text=True, check=True).stdout
    names = {alt.split("|")[0].split("(")[0].strip().removesuffix(":any")
             for alt in field.split(",") if alt.strip()}
    return sorted(names)


def bare_root(packages: list[str], into: Path) -> Chroot:
    """The Debian root with ``packages``, from the cache or made by mmdebstrap."""
    key = hashlib.sha256(" ".join([SUITE, VARIANT, *packages]).encode()).hexdigest()[:16]
    tarball = CACHE / f"chroot-{SUITE}-{key}.tar"
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        # mmdebstrap picks the format by the name's end; the pid keeps two runs apart
        part = tarball.with_name(f".{tarball.stem}.{os.getpid()}.part.tar")
        r = subprocess.run(["mmdebstrap", "--quiet", f"--variant={VARIANT}",
                            "--include=" + ",".join(packages), SUITE, str(part)],
                           capture_output=True, text=True, timeout=1200, check=False)
        assert r.returncode == 0, f"mmdebstrap failed:\n{r.stderr[-3000:]}"
        part.replace(tarball)
    into.mkdir()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(into)], check=True)
    return Chroot(into)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, mounts, dpkg inside the root)")
    for tool in ("dpkg-buildpackage", "lintian", "mmdebstrap", "unshare"):
        assert shutil.which(tool), f"{tool} is missing ({SETUP_HINT})"
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run(["bash", str(REPO / "integration" / "build_deb.sh"), str(out)],
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"build_deb.sh failed:\n{r.stderr[-4000:]}"
    deb = Path(r.stdout.strip().splitlines()[-1])
    chroot = bare_root(sorted({*depends_of(deb), *EXTRA_PACKAGES}),
                       tmp_path_factory.mktemp("chroot") / "root")
    try:
        before = frozenset(chroot.paths())
        shutil.copy(deb, chroot.root / "tmp" / deb.name)
        chroot.ok("apt-get", "install", "-y", "--no-install-recommends", f"/tmp/{deb.name}")
        (chroot.root / "tmp" / deb.name).unlink()
        owned = tuple(p for p in chroot.ok("dpkg", "-L", "vmshare").splitlines() if p != "/.")
        conffiles = frozenset(line.split()[0] for line in chroot.ok(
            "dpkg-query", "-W", "-f=${Conffiles}\n", "vmshare").splitlines() if line.strip())
        yield Installed(deb, (out / "lintian.txt").read_text(), chroot, before, owned,
                        conffiles)
    finally:
        shutil.rmtree(chroot.root, ignore_errors=True)


def test_lintian_finds_no_error(installed: Installed) -> None:
    errors = [line for line in installed.lintian.splitlines() if line.startswith("E: ")]
    assert errors == []


def test_deb_is_named_for_the_version(installed: Installed) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert re.fullmatch(rf"vmshare_{re.escape(version)}-\d+_amd64\.deb", installed.deb.name)


def test_package_holds_every_part(installed: Installed) -> None:
    owned = set(installed.owned)
    for path in ("/usr/bin/vmshare", "/lib/systemd/system/vmshare.service",
                 "/usr/lib/vmshare/python/qemu/qmp/__init__.py",
                 "/usr/share/vmshare/hooks/vmshare-qemu-hook", *CONFFILES):
        assert path in owned, path
    assert any(re.fullmatch(r"/usr/lib/python3/dist-packages/vmshare/engine/"
                            r"_pages\.cpython-3\d+-x86_64-linux-gnu\.so", p) for p in owned)
    assert installed.conffiles == CONFFILES
    unit = (installed.chroot.root / "lib/systemd/system/vmshare.service").read_text()
    assert re.search(r"^ExecStart=/usr/bin/vmshare daemon ", unit, re.M), unit


def test_installed_unit_verifies(installed: Installed, tmp_path: Path) -> None:
    """The unit as the package installs it (its ExecStart= the package's command),
    through the host's `systemd-analyze verify`."""
    root = installed.chroot.root
    unit = (root / "lib/systemd/system/vmshare.service").read_text()
    assert systemd_verify(unit, tmp_path, root / "usr/bin/vmshare") == ""


def test_version(installed: Installed) -> None:
    from vmshare import __version__
    assert installed.chroot.ok("vmshare", "--version").strip() == f"vmshare {__version__}"


def test_status_without_libvirtd_is_one_line_error(installed: Installed) -> None:
    r = installed.chroot.run("vmshare", "status")
    assert r.returncode not in (0, 70), r.stderr   # 70: EXIT_INTERNAL, a bug
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmshare: error: "), r.stderr


def test_ksm_show_reads_the_host_kernel(installed: Installed) -> None:
    shown = json.loads(installed.chroot.ok("vmshare", "ksm", "show", "--json"))
    ksm = Path("/sys/kernel/mm/ksm")
    for knob in ("run", "pages_to_scan", "merge_across_nodes"):
        assert shown["knobs"][knob] == int((ksm / knob).read_text()), knob


def test_hook_status_recognises_the_shipped_dropin(installed: Installed) -> None:
    st = json.loads(installed.chroot.ok("vmshare", "hook", "status", "--json"))
    assert st["path"] == "/etc/libvirt/hooks/qemu.d/vmshare"
    assert st["state"] == "installed", st["messages"]


def test_shipped_config_loads(installed: Installed) -> None:
    # `history` reads /etc/vmshare/vmshare.toml for history_file
    r = installed.chroot.run("vmshare", "history")
    assert r.returncode == 0 and "vmshare.toml" not in r.stderr, r.stderr
    # and the same command does refuse a bad one, so the check above means something
    broken = installed.chroot.run("sh", "-c", "echo 'bogus = 1' > /tmp/nope.toml; "
                                  "VMSHARE_CONFIG=/tmp/nope.toml vmshare history")
    assert broken.returncode != 0 and "/tmp/nope.toml" in broken.stderr, broken.stderr


def test_qemu_qmp_is_bundled_privately(installed: Installed) -> None:
    c = installed.chroot
    # not on the system's path: only vmshare's command puts it there
    assert c.run("python3", "-c", "import qemu.qmp").returncode != 0
    where = c.ok("python3", "-c", "import sys; sys.path.insert(0, '/usr/lib/vmshare/python'); "
                 "import qemu.qmp, vmshare.hypervisor.qmp; print(qemu.qmp.__file__)")
    assert where.strip() == "/usr/lib/vmshare/python/qemu/qmp/__init__.py"
    # through the command, the plain-QEMU adapter loads and answers a missing socket
    r = c.run("vmshare", "--qmp", "/run/no-such-qemu.sock", "status")
    lines = r.stderr.strip().splitlines()
    assert r.returncode not in (0, 70) and len(lines) == 1, r.stderr
    assert lines[0].startswith("vmshare: error: ") and "no-such-qemu" in lines[0], r.stderr


def test_man_page(installed: Installed) -> None:
    if "/usr/share/man/man1/vmshare.1.gz" not in installed.owned:
        pytest.skip("this tree has no man page generator (vmshare/cli/manpage.py) yet")
    page = installed.chroot.ok("man", "-P", "cat", "vmshare")
    assert "vmshare" in page and "--version" in page


def test_completions(installed: Installed) -> None:
    bash = "/usr/share/bash-completion/completions/vmshare"
    if bash not in installed.owned:
        pytest.skip("this tree has no completion generator (vmshare/cli/completion.py) yet")
    assert "/usr/share/zsh/vendor-completions/_vmshare" in installed.owned
    spec = installed.chroot.ok("bash", "-c", f"source {bash} && complete -p vmshare")
    assert spec.startswith("complete ") and spec.strip().endswith(" vmshare"), spec


def test_unit_is_installed_disabled(installed: Installed) -> None:
    # enabling is the operator's step (see debian/rules); dpkg only records the unit
    wants = installed.chroot.root / "etc/systemd/system/multi-user.target.wants"
    assert not (wants / "vmshare.service").is_symlink()
    state = installed.chroot.root / "var/lib/systemd/deb-systemd-helper-enabled"
    assert state.is_dir(), "dh_installsystemd's update-state did not run"


def test_purge_leaves_nothing(installed: Installed) -> None:
    c = installed.chroot
    for path in RUNTIME_FILES:
        c.ok("sh", "-c", f"mkdir -p $(dirname {path}) && echo '{{}}' > {path}")
    c.ok("apt-get", "purge", "-y", "vmshare")
    assert c.run("dpkg", "-s", "vmshare").returncode != 0
    left = [p for p in installed.owned
            if os.path.lexists(c.root / p.lstrip("/"))
            and c.run("dpkg", "-S", p).returncode != 0]   # a directory another package owns
    assert left == []
    assert not any(os.path.lexists(c.root / p.lstrip("/")) for p in installed.conffiles)
    assert sorted(c.paths() - installed.before) == []
