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
    adopt_domain_xml,
    adopted_element,
    element_from_xml,
    owner_from_domain_xml,
    policy_from_domain_xml,
    policy_from_xml,
    policy_to_xml,
)
from vmshare.model import Adoption, VmFacts, VmRef

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


# ---- adoption: <nosharepages/> and whose it is

FOREIGN = ("<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
           "<name>web</name><metadata><lib:os xmlns:lib='http://libosinfo.org/xmlns/libvirt/"
           "domain/1.0' id='x'/></metadata><memory>1</memory><qemu:commandline>"
           "<qemu:arg value='-s'/></qemu:commandline></domain>")


def test_adopt_adds_nosharepages_keeps_foreign_namespaces_and_is_idempotent() -> None:
    new, owner = adopt_domain_xml(FOREIGN)
    assert owner == "vmshare" and new is not None
    assert "<memoryBacking><nosharepages /></memoryBacking>" in new
    assert "<qemu:arg " in new and "<lib:os " in new and "ns0" not in new
    assert owner_from_domain_xml(new) == "vmshare"
    assert policy_from_domain_xml(new) == VmPolicy()   # no policy set: inherit
    assert adopt_domain_xml(new) == (None, "vmshare")


def test_adopt_records_the_operators_own_nosharepages() -> None:
    theirs = ("<domain><name>db</name><memoryBacking><nosharepages/></memoryBacking>"
              f"<metadata><vmshare:policy xmlns:vmshare='{NAMESPACE}' merge='on'/></metadata>"
              "</domain>")
    new, owner = adopt_domain_xml(theirs)
    assert owner == "operator" and new is not None and new.count("nosharepages />") == 1
    assert owner_from_domain_xml(new) == "operator"
    assert policy_from_domain_xml(new) == VmPolicy("on")   # the policy is kept
    assert adopt_domain_xml(new) == (None, "operator")


def test_owner_record_round_trip_and_bad_values() -> None:
    text = policy_to_xml(VmPolicy("on", "g"), "vmshare")
    assert element_from_xml(text) == (VmPolicy("on", "g"), "vmshare")
    assert element_from_xml(policy_to_xml(None, "operator")) == (None, "operator")
    with pytest.raises(PolicyError, match="nosharepages must be vmshare or operator, not 'me'"):
        element_from_xml('<policy nosharepages="me"/>')
    with pytest.raises(PolicyError, match="nosharepages must be"):
        adopt_domain_xml(f"<domain><name>x</name><metadata><v:policy xmlns:v='{NAMESPACE}' "
                         "nosharepages='yes'/></metadata></domain>")


@pytest.fixture
def private(tmp_path: Path) -> Iterator[LibvirtHypervisor]:
    """A test-driver host of this test's own (test:///default is shared by the process)."""
    node = tmp_path / "node.xml"
    node.write_text("<node><domain type='test'><name>test</name><memory>8192</memory>"
                    "<os><type arch='x86_64'>hvm</type></os></domain></node>")
    h = LibvirtHypervisor(f"test://{node}", deadline=5.0, run_dir=str(tmp_path))
    try:
        yield h
    finally:
        h.close()


def test_adopt_on_libvirt_running_then_restarted(private: LibvirtHypervisor) -> None:
    import libvirt
    hv = private
    ref = hv.lookup("test")
    assert hv.adopt(ref) == Adoption("test", "adopted", changed=True, running=True)
    dom = hv._conn.lookupByName("test")
    assert "<nosharepages/>" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<nosharepages/>" not in dom.XMLDesc(0)   # the running QEMU keeps its options
    # a policy written afterwards keeps the record
    hv.set_policy(ref, VmPolicy("on", "g"), live=True, config=True)
    assert hv.adopt(ref) == Adoption("test", "already", running=True)
    assert hv.get_policy(ref, config=True) == VmPolicy("on", "g")
    dom.destroy()
    dom.create()   # started again: from the adopted definition
    live = dom.XMLDesc(0)
    assert "<nosharepages/>" in live and owner_from_domain_xml(live) == "vmshare"
    # removing the policy keeps the record too
    hv.set_policy(ref, None, live=True, config=True)
    assert owner_from_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == "vmshare"
    assert hv.get_policy(ref) is None


def test_adopt_on_libvirt_operator_and_transient(private: LibvirtHypervisor) -> None:
    hv = private
    conn = hv._conn
    base = "<memory>8192</memory><os><type arch='x86_64'>hvm</type></os></domain>"
    conn.defineXML("<domain type='test'><name>db</name><memoryBacking><nosharepages/>"
                   "</memoryBacking>" + base)
    db = hv.lookup("db")
    assert hv.adopt(db) == Adoption("db", "operator", changed=True)
    assert hv.adopt(db) == Adoption("db", "operator")
    facts = hv.facts(db)
    assert facts.nosharepages_owner == "operator"
    assert facts.ineligible_reason == ("<memoryBacking><nosharepages/> is set by the operator "
                                       "(recorded when vmshare adopted the domain)")
    conn.createXML("<domain type='test'><name>tmp</name>" + base, 0)
    assert hv.adopt(hv.lookup("tmp")) == Adoption("tmp", "transient", running=True)
    # a transient domain written already adopted (or with the operator's own) says so
    backing = "<memoryBacking><nosharepages/></memoryBacking>"
    conn.createXML(f"<domain type='test'><name>tmp2</name><metadata>{adopted_element()}"
                   f"</metadata>{backing}" + base, 0)
    assert hv.adopt(hv.lookup("tmp2")) == Adoption("tmp2", "already", running=True)
    conn.createXML(f"<domain type='test'><name>tmp3</name>{backing}" + base, 0)
    assert hv.adopt(hv.lookup("tmp3")) == Adoption("tmp3", "operator", running=True)


def test_a_domain_written_adopted_is_eligible_an_unrecorded_nosharepages_is_not() -> None:
    xml = (f"<domain><name>t</name><metadata>{adopted_element()}</metadata>"
           "<memoryBacking><nosharepages/></memoryBacking></domain>")
    assert owner_from_domain_xml(xml) == "vmshare"
    assert adopt_domain_xml(xml) == (None, "vmshare")
    ref = VmRef("t", "")
    assert VmFacts(ref, 1, nosharepages=True, nosharepages_owner="vmshare") \
        .ineligible_reason is None
    assert VmFacts(ref, 1, nosharepages=True).ineligible_reason == \
        "<memoryBacking><nosharepages/> is set"
