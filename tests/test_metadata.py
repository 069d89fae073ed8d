"""vmshare.hypervisor.metadata: round trip, hostile XML, and libvirt's metadata API (test:///default)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshare.config import VmPolicy
from vmshare.errors import DomainNotFound, HypervisorError, PolicyError, UsageError
from vmshare.hypervisor.libvirt import LibvirtHypervisor
from vmshare.hypervisor.metadata import (
    MAX_POLICY_XML_BYTES,
    NAMESPACE,
    policy_from_domain_xml,
    policy_from_xml,
    policy_to_xml,
)
from vmshare.model import VmRef

POLICIES = [VmPolicy(), VmPolicy("on"), VmPolicy("off", "tenant-a"),
            VmPolicy("inherit", "g.1_x", True), VmPolicy("on", None, True)]


@pytest.mark.parametrize("policy", POLICIES)
def test_round_trip(policy: VmPolicy) -> None:
    text = policy_to_xml(policy)
    assert text.startswith("<policy ") and "xmlns" not in text
    assert policy_from_xml(text) == policy
    namespaced = text.replace("<policy ", f'<vmshare:policy xmlns:vmshare="{NAMESPACE}" ')
    assert policy_from_xml(namespaced) == policy


def test_to_xml_shape() -> None:
    assert policy_to_xml(VmPolicy("on", "tenant-a")) == \
        '<policy merge="on" group="tenant-a" force="no" />'


def test_defaults_when_attributes_are_absent() -> None:
    assert policy_from_xml("<policy/>") == VmPolicy()
    assert policy_from_xml('<policy force="YES"/>') == VmPolicy(force=True)


@pytest.mark.parametrize(("text", "needle"), [
    ('<policy merge="on" share="yes" colour="red"/>', "unknown attribute(s) colour, share"),
    ('<policy merge="sometimes"/>', "merge must be one of on, off, inherit"),
    ('<policy force="maybe"/>', "force must be yes or no"),
    ('<policy group="a b"/>', "bad trust group name"),
    ("<other/>", "expected a <policy> element"),
    ('<x:policy xmlns:x="https://evil.example/ns"/>', "expected a <policy> element"),
    ("<policy><child/></policy>", "must be empty"),
    ("<policy>text</policy>", "must be empty"),
    ("<policy", "not well-formed"),
    ("", "not well-formed"),
    ('<?xml version="1.0"?><!DOCTYPE policy [<!ENTITY x "on">]><policy merge="&x;"/>',
     "DOCTYPE or ENTITY"),
    ('<!DOCTYPE policy SYSTEM "file:///etc/passwd"><policy/>', "DOCTYPE or ENTITY"),
    ("<policy " + "a" * MAX_POLICY_XML_BYTES + '="1"/>', "too large"),
])
def test_hostile_or_malformed(text: str, needle: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_from_xml(text)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_billion_laughs_is_refused_before_parsing() -> None:
    lol = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
           '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
           '<policy group="&lol2;"/>')
    with pytest.raises(PolicyError, match="DOCTYPE or ENTITY"):
        policy_from_xml(lol)


DOMAIN = f"""<domain type='kvm'>
  <name>web</name>
  <metadata>
    <other:thing xmlns:other="https://other.example/1" merge="on"/>
    <vmshare:policy xmlns:vmshare="{NAMESPACE}" merge="off" group="tenant-b" force="yes"/>
  </metadata>
</domain>"""


def test_from_domain_xml() -> None:
    assert policy_from_domain_xml(DOMAIN) == VmPolicy("off", "tenant-b", True)
    assert policy_from_domain_xml("<domain><name>x</name></domain>") is None
    no_ns = DOMAIN.replace(f' xmlns:vmshare="{NAMESPACE}"', ' xmlns:vmshare="urn:other"')
    assert policy_from_domain_xml(no_ns) is None
    twice = DOMAIN.replace("</metadata>", f'<p:policy xmlns:p="{NAMESPACE}"/></metadata>')
    with pytest.raises(PolicyError, match="web: more than one vmshare policy element"):
        policy_from_domain_xml(twice)
    bad = DOMAIN.replace('force="yes"', 'force="yes" evil="1"')
    with pytest.raises(PolicyError, match="web: vmshare policy metadata: unknown attribute"):
        policy_from_domain_xml(bad)
    with pytest.raises(PolicyError, match="DOCTYPE"):
        policy_from_domain_xml('<!DOCTYPE d [<!ENTITY e "x">]>' + DOMAIN)


# ---- the libvirt adapter on test:///default (a private host per connection)

@pytest.fixture
def hv(tmp_path: Path) -> Iterator[LibvirtHypervisor]:
    h = LibvirtHypervisor("test:///default", deadline=5.0, run_dir=str(tmp_path))
    try:
        yield h
    finally:
        h.close()


def test_get_set_remove_live_and_config(hv: LibvirtHypervisor) -> None:
    ref = hv.lookup("test")
    assert hv.get_policy(ref) is None
    hv.set_policy(ref, VmPolicy("on", "tenant-a"), live=True, config=False)
    assert hv.get_policy(ref) == VmPolicy("on", "tenant-a")
    assert hv.get_policy(ref, config=True) is None
    hv.set_policy(ref, VmPolicy("off", force=True), live=False, config=True)
    assert hv.get_policy(ref, config=True) == VmPolicy("off", force=True)
    assert hv.get_policy(ref) == VmPolicy("on", "tenant-a")
    # the element as libvirt keeps it in the domain XML, in our namespace
    xml = hv._conn.lookupByName("test").XMLDesc(0)
    assert f'xmlns:vmshare="{NAMESPACE}"' in xml
    assert policy_from_domain_xml(xml) == VmPolicy("on", "tenant-a")
    hv.set_policy(ref, None, live=True, config=True)
    assert hv.get_policy(ref) is None and hv.get_policy(ref, config=True) is None
    hv.set_policy(ref, None, live=True, config=False)     # removing nothing is fine


def test_malformed_element_in_libvirt_is_a_policy_error(hv: LibvirtHypervisor) -> None:
    import libvirt
    dom = hv._conn.lookupByName("test")
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<policy merge="always"/>',
                    "vmshare", NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    with pytest.raises(PolicyError, match="test: vmshare policy metadata: merge must be"):
        hv.get_policy(hv.lookup("test"))


def test_errors(hv: LibvirtHypervisor) -> None:
    ref = hv.lookup("test")
    with pytest.raises(UsageError):
        hv.set_policy(ref, VmPolicy(), live=False, config=False)
    gone = VmRef("gone", "00000000-0000-0000-0000-00000000abcd")
    with pytest.raises(DomainNotFound):
        hv.get_policy(gone)
    with pytest.raises(DomainNotFound):
        hv.set_policy(gone, VmPolicy(), live=True, config=False)
    hv._conn.lookupByName("test").destroy()
    with pytest.raises(HypervisorError):    # LIVE on a shut-off domain
        hv.set_policy(hv.lookup("test"), VmPolicy("on"), live=True, config=False)
