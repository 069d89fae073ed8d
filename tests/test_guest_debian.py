"""vmshare.guest.debian without building anything: mirror discovery, the cache key,
the domain XML, and the ready-line wait on a console file."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmshare.errors import ImageBuildError, UsageError
from vmshare.guest import debian
from vmshare.guest.debian import DebianImage, apt_mirror, debian_domain_xml, image_key
from vmshare.guest.launch import GuestBootFailed, GuestBootTimeout


def test_mirror_from_deb822_sources_skips_security(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")
    assert apt_mirror(tmp_path) == "http://mirror.example/debian/"


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://ftp.example/debian bookworm main\n")
    assert apt_mirror(tmp_path) == "http://ftp.example/debian"


def test_no_mirror_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb http://example/ubuntu jammy main\n")
    with pytest.raises(ImageBuildError, match="no Debian mirror"):
        apt_mirror(tmp_path)


def test_cache_key_follows_every_input(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = Path("/boot/vmlinuz-6.1.0-1-cloud-amd64")
    base = image_key("http://a/debian", kernel)
    assert base == image_key("http://a/debian", kernel)
    assert base != image_key("http://b/debian", kernel)
    assert base != image_key("http://a/debian", Path("/boot/vmlinuz-6.1.0-2-cloud-amd64"))
    monkeypatch.setattr(debian, "PACKAGES", (*debian.PACKAGES, "nginx-light"))
    assert base != image_key("http://a/debian", kernel)
    monkeypatch.setattr(debian, "_FILES", {**debian._FILES, "etc/motd": "hello\n"})
    assert image_key("http://a/debian", kernel) not in (base,)


IMAGE = DebianImage(root=Path("/cache/root.img"), kernel=Path("/boot/vmlinuz-x"),
                    initrd=Path("/boot/initrd.img-x"))


def attribute(root: ET.Element, path: str, name: str) -> str | None:
    """Attribute ``name`` of the first element at ``path`` (which must exist)."""
    element = root.find(path)
    assert element is not None, f"no {path}"
    return element.get(name)


def test_domain_xml_boots_the_overlay_under_tcg(tmp_path: Path) -> None:
    xml = debian_domain_xml("deb-1", IMAGE, tmp_path / "deb-1.qcow2",
                            console_log=tmp_path / "deb-1.log", memory_mib=512, video=True,
                            metadata_xml='<p:x xmlns:p="urn:test"/>')
    dom = ET.fromstring(xml)
    assert dom.get("type") == "qemu"
    assert dom.findtext("memory") == "512"
    assert dom.findtext("os/kernel") == "/boot/vmlinuz-x"
    assert "root=/dev/vda" in (dom.findtext("os/cmdline") or "")
    assert attribute(dom, "devices/disk/driver", "type") == "qcow2"
    assert attribute(dom, "devices/disk/source", "file") == str(tmp_path / "deb-1.qcow2")
    assert attribute(dom, "devices/disk/target", "dev") == "vda"
    assert attribute(dom, "devices/video/model", "type") == "vga"
    assert dom.find("memoryBacking") is None
    assert dom.find("metadata/{urn:test}x") is not None
    plain = ET.fromstring(debian_domain_xml("d", IMAGE, tmp_path / "o", console_log=tmp_path / "l",
                                            nosharepages=True))
    assert plain.find("devices/video") is None
    assert plain.find("memoryBacking/nosharepages") is not None


def test_domain_xml_asks_the_guest_for_its_fill(tmp_path: Path) -> None:
    fill = debian.GuestFill(seed=41, mib=128)
    dom = ET.fromstring(debian_domain_xml("d", IMAGE, tmp_path / "o", console_log=tmp_path / "l",
                                          memory_mib=256, fill=fill))
    cmdline = (dom.findtext("os/cmdline") or "").split()
    assert cmdline[-1] == "vmshare.fill=41:128" and "root=/dev/vda" in cmdline
    assert fill.marker == "vmshare-guest: filled 41:128"
    # the unit that reads it is in the image, ordered before the ready line
    assert "ExecStart=/bin/sh /usr/local/lib/vmshare-fill" in debian._FILES[
        "etc/systemd/system/vmshare-fill.service"]
    assert "vmshare-fill.service" in debian._READY_UNIT


@pytest.mark.parametrize(("fill", "memory_mib"), [((1, 0), 512), ((1, 257), 512),
                                                  ((-1, 8), 512), ((1, 129), 256)])
def test_domain_xml_refuses_a_fill_that_cannot_fit(tmp_path: Path, fill: tuple[int, int],
                                                   memory_mib: int) -> None:
    with pytest.raises(UsageError, match="half the guest's RAM"):
        debian_domain_xml("d", IMAGE, tmp_path / "o", console_log=tmp_path / "l",
                          memory_mib=memory_mib, fill=debian.GuestFill(*fill))


@pytest.mark.parametrize(("name", "memory_mib", "metadata_xml", "message"), [
    ("", 512, None, "name must not be empty"),
    ("d", 128, None, "at least 256 MiB"),
    ("d", 512, "<unclosed", "not well-formed"),
])
def test_domain_xml_refuses_bad_input(tmp_path: Path, name: str, memory_mib: int,
                                      metadata_xml: str | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        debian_domain_xml(name, IMAGE, tmp_path / "o", console_log=tmp_path / "l",
                          memory_mib=memory_mib, metadata_xml=metadata_xml)


def test_overlay_path_with_a_comma_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="comma"):
        debian.make_overlay(IMAGE, tmp_path / "a,b.qcow2")


def test_wait_returns_the_reported_uptime(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("[  1.0] booting\nvmshare-guest: ready uptime=27.31\n")
    assert debian.wait_debian_ready(log, timeout=1) == pytest.approx(27.31)
    log.write_text("Debian GNU/Linux 12 vmshare-guest ttyS0\n\n"
                   "vmshare-guest login: vmshare-guest: ready uptime=3.5\n")
    assert debian.wait_debian_ready(log, timeout=1) == pytest.approx(3.5)


def test_wait_fails_fast_on_emergency_mode_and_times_out_otherwise(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("You are in emergency mode. After logging in...\n")
    with pytest.raises(GuestBootFailed, match="emergency mode"):
        debian.wait_debian_ready(log, timeout=5)
    log.write_text("still booting\n")
    with pytest.raises(GuestBootTimeout, match="still booting"):
        debian.wait_debian_ready(log, timeout=0.3, poll=0.05)


def test_wait_notices_qemu_is_gone(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("")
    with pytest.raises(GuestBootFailed, match="exited"):
        debian.wait_debian_ready(log, timeout=5, pid=2**22 + 12345)
