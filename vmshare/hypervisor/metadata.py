"""A domain's own vmshare policy, kept in libvirt domain metadata. Pure: no I/O.

libvirt lets applications keep one element per XML namespace inside a
domain's ``<metadata>``; vmshare's is::

    <metadata>
      <vmshare:policy xmlns:vmshare="https://vmshare.dev/xmlns/policy/1"
                      merge="on" group="tenant-a" force="no" nosharepages="vmshare"/>
    </metadata>

``nosharepages`` says whose the domain's ``<memoryBacking><nosharepages/>``
is. QEMU's machine default ``mem-merge=on`` makes every RAM block mergeable,
VRAM and ROMs included, and only the RAM backends' ``merge`` can be turned
off at run time; so vmshare brings the domains it manages to
``<nosharepages/>`` (QEMU then starts with ``mem-merge=off``: nothing
mergeable) and turns merging on per RAM backend. ``vmshare`` marks a
``<nosharepages/>` vmshare added (merging is then vmshare's to turn on);
``operator`` records one that was there before vmshare adopted the domain,
which keeps meaning "never merge". ``adopt_domain_xml`` does the adoption.

It is written and read with virDomainSetMetadata/virDomainGetMetadata
(type VIR_DOMAIN_METADATA_ELEMENT, key ``vmshare``, the namespace URI), which
hand the element over without its namespace; ``policy_from_domain_xml`` reads
it out of a whole domain XML (the hook and the daemon see those).

The element comes from whoever can define domains, so it is parsed as
hostile input: bounded size, no DOCTYPE or entities, no unknown attributes
or children; every problem is a PolicyError naming it.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from typing import Literal, cast

from vmshare.config import MergeSetting, VmPolicy
from vmshare.errors import PolicyError

NAMESPACE = "https://vmshare.dev/xmlns/policy/1"
PREFIX = "vmshare"          # the ``key`` libvirt uses as the namespace prefix
ELEMENT = "policy"
MAX_POLICY_XML_BYTES = 4096
MAX_DOMAIN_XML_BYTES = 4 * 1024 * 1024
POLICY_ATTRIBUTES = ("merge", "group", "force")
OWNER_ATTRIBUTE = "nosharepages"
ATTRIBUTES = (*POLICY_ATTRIBUTES, OWNER_ATTRIBUTE)
Owner = Literal["vmshare", "operator"]
OWNERS: tuple[Owner, ...] = ("vmshare", "operator")
_BOOL = {"yes": True, "no": False, "true": True, "false": False, "on": True, "off": False,
         "1": True, "0": False}
_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def _parse(text: str | bytes, limit: int, what: str) -> ET.Element:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if len(raw) > limit:
        raise PolicyError(f"{what} is too large ({len(raw)} bytes, at most {limit})")
    if _DTD.search(raw):
        raise PolicyError(f"{what} contains a DOCTYPE or ENTITY declaration; refused")
    try:
        return ET.fromstring(raw)
    except ET.ParseError as exc:
        raise PolicyError(f"{what} is not well-formed XML: {exc}") from exc


def _local(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return None, tag


def policy_to_xml(policy: VmPolicy | None, owner: Owner | None = None) -> str:
    """The element for virDomainSetMetadata (libvirt adds the namespace); with
    no policy, only the record of whose ``<nosharepages/>`` it is."""
    el = ET.Element(ELEMENT)
    if policy is not None:
        el.set("merge", policy.merge)
        if policy.group is not None:
            el.set("group", policy.group)
        el.set("force", "yes" if policy.force else "no")
    if owner is not None:
        el.set(OWNER_ATTRIBUTE, owner)
    return ET.tostring(el, encoding="unicode")


def _owner(el: ET.Element, what: str) -> Owner | None:
    value = el.get(OWNER_ATTRIBUTE)
    if value is None:
        return None
    if value not in OWNERS:
        raise PolicyError(f"{what}: {OWNER_ATTRIBUTE} must be vmshare or operator, "
                          f"not {value!r}")
    return value


def _from_element(el: ET.Element, what: str) -> VmPolicy:
    ns, local = _local(el.tag)
    if local != ELEMENT or ns not in (None, NAMESPACE):
        raise PolicyError(f"{what}: expected a <{ELEMENT}> element, not <{el.tag}>")
    unknown = sorted(a for a in el.attrib if a not in ATTRIBUTES)
    if unknown:
        raise PolicyError(f"{what}: unknown attribute(s) {', '.join(unknown)} "
                          f"(known: {', '.join(ATTRIBUTES)})")
    if len(el) or (el.text or "").strip():
        raise PolicyError(f"{what}: <{ELEMENT}> must be empty (attributes only)")
    _owner(el, what)
    merge = el.get("merge", "inherit")
    force_text = el.get("force", "no")
    if force_text.lower() not in _BOOL:
        raise PolicyError(f"{what}: force must be yes or no, not {force_text!r}")
    group = el.get("group")
    try:   # VmPolicy checks merge and the group name
        return VmPolicy(merge=cast(MergeSetting, merge), group=group or None,
                        force=_BOOL[force_text.lower()])
    except PolicyError as exc:
        raise PolicyError(f"{what}: {exc}") from exc


def policy_from_xml(text: str | bytes, *, what: str = "vmshare policy metadata") -> VmPolicy:
    """Parse the element virDomainGetMetadata returns. Raises PolicyError."""
    return _from_element(_parse(text, MAX_POLICY_XML_BYTES, what), what)


def element_from_xml(text: str | bytes, *, what: str = "vmshare policy metadata"
                     ) -> tuple[VmPolicy | None, Owner | None]:
    """The element virDomainGetMetadata returns: its policy (None when it
    carries only the nosharepages record) and whose nosharepages it records.
    Raises PolicyError."""
    el = _parse(text, MAX_POLICY_XML_BYTES, what)
    policy = _from_element(el, what)
    has_policy = any(a in el.attrib for a in POLICY_ATTRIBUTES)
    return (policy if has_policy else None), _owner(el, what)


def _policy_element(root: ET.Element) -> ET.Element | None:
    name = root.findtext("name") or "domain"
    found = None
    for meta in root.findall("metadata"):
        for child in meta:
            if _local(child.tag) == (NAMESPACE, ELEMENT):
                if found is not None:
                    raise PolicyError(f"{name}: more than one vmshare policy element")
                found = child
    return found


def policy_from_domain_xml(domain_xml: str | bytes) -> VmPolicy | None:
    """The policy element inside a full domain XML's <metadata>, or None.

    Raises PolicyError for an oversized or hostile document, or a malformed element.
    """
    root = _parse(domain_xml, MAX_DOMAIN_XML_BYTES, "domain XML")
    found = _policy_element(root)
    if found is None:
        return None
    return _from_element(found, f"{root.findtext('name') or 'domain'}: vmshare policy metadata")


def owner_from_domain_xml(domain_xml: str | bytes) -> Owner | None:
    """Whose ``<nosharepages/>`` the domain's vmshare element records, or None.

    Raises PolicyError for an oversized or hostile document, or a malformed element.
    """
    root = _parse(domain_xml, MAX_DOMAIN_XML_BYTES, "domain XML")
    found = _policy_element(root)
    name = root.findtext("name") or "domain"
    return None if found is None else _owner(found, f"{name}: vmshare policy metadata")


def adopt_domain_xml(domain_xml: str) -> tuple[str | None, Owner]:
    """Bring a persistent domain definition under vmshare's merge control.

    Returns (the new definition, or None when nothing changes; the owner now
    recorded). A domain already adopted keeps its record. One whose
    ``<nosharepages/>`` is the operator's gets ``nosharepages="operator"``
    (never merged); any other gets ``<memoryBacking><nosharepages/>`` and
    ``nosharepages="vmshare"``. Namespace prefixes of other applications'
    metadata are kept. Raises PolicyError (hostile or malformed document).
    """
    raw = domain_xml.encode("utf-8")
    root = _parse(raw, MAX_DOMAIN_XML_BYTES, "domain XML")
    el = _policy_element(root)
    name = root.findtext("name") or "domain"
    owner = None if el is None else _owner(el, f"{name}: vmshare policy metadata")
    backing = root.find("memoryBacking")
    has_nosharepages = backing is not None and backing.find("nosharepages") is not None
    if owner == "operator" or (owner == "vmshare" and has_nosharepages):
        return None, owner
    owner = "operator" if has_nosharepages else "vmshare"
    if owner == "vmshare":
        if backing is None:
            backing = ET.SubElement(root, "memoryBacking")
        ET.SubElement(backing, "nosharepages")
    if el is None:
        meta = root.find("metadata")
        if meta is None:
            meta = ET.SubElement(root, "metadata")
        el = ET.SubElement(meta, f"{{{NAMESPACE}}}{ELEMENT}")
    el.set(OWNER_ATTRIBUTE, owner)
    return _serialise(root, raw), owner


def adopted_element() -> str:
    """vmshare's element, namespaced, recording a ``<nosharepages/>`` as vmshare's:
    for a domain XML written already adopted (a transient domain has no
    persistent definition ``adopt_domain_xml`` could change)."""
    return (f'<{PREFIX}:{ELEMENT} xmlns:{PREFIX}="{NAMESPACE}" '
            f'{OWNER_ATTRIBUTE}="vmshare"/>')


def _serialise(root: ET.Element, raw: bytes) -> str:
    """``root`` as text, with the namespace prefixes ``raw`` declared (ElementTree
    would otherwise rename them ns0, ns1...)."""
    for _event, (prefix, uri) in ET.iterparse(io.BytesIO(raw), events=("start-ns",)):
        if prefix and not re.fullmatch(r"ns\d+", prefix):
            ET.register_namespace(prefix, uri)
    ET.register_namespace(PREFIX, NAMESPACE)
    return ET.tostring(root, encoding="unicode")
