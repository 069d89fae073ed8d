"""A domain's own vmshare policy, kept in libvirt domain metadata. Pure: no I/O.

libvirt lets applications keep one element per XML namespace inside a
domain's ``<metadata>``; vmshare's is::

    <metadata>
      <vmshare:policy xmlns:vmshare="https://vmshare.dev/xmlns/policy/1"
                      merge="on" group="tenant-a" force="no"/>
    </metadata>

It is written and read with virDomainSetMetadata/virDomainGetMetadata
(type VIR_DOMAIN_METADATA_ELEMENT, key ``vmshare``, the namespace URI), which
hand the element over without its namespace; ``policy_from_domain_xml`` reads
it out of a whole domain XML (the hook and the daemon see those).

The element comes from whoever can define domains, so it is parsed as
hostile input: bounded size, no DOCTYPE or entities, no unknown attributes
or children; every problem is a PolicyError naming it.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import cast

from vmshare.config import MergeSetting, VmPolicy
from vmshare.errors import PolicyError

NAMESPACE = "https://vmshare.dev/xmlns/policy/1"
PREFIX = "vmshare"          # the ``key`` libvirt uses as the namespace prefix
ELEMENT = "policy"
MAX_POLICY_XML_BYTES = 4096
MAX_DOMAIN_XML_BYTES = 4 * 1024 * 1024
ATTRIBUTES = ("merge", "group", "force")
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


def policy_to_xml(policy: VmPolicy) -> str:
    """The element for virDomainSetMetadata (libvirt adds the namespace)."""
    el = ET.Element(ELEMENT, {"merge": policy.merge})
    if policy.group is not None:
        el.set("group", policy.group)
    el.set("force", "yes" if policy.force else "no")
    return ET.tostring(el, encoding="unicode")


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


def policy_from_domain_xml(domain_xml: str | bytes) -> VmPolicy | None:
    """The policy element inside a full domain XML's <metadata>, or None.

    Raises PolicyError for an oversized or hostile document, or a malformed element.
    """
    root = _parse(domain_xml, MAX_DOMAIN_XML_BYTES, "domain XML")
    name = root.findtext("name") or "domain"
    found = None
    for meta in root.findall("metadata"):
        for child in meta:
            if _local(child.tag) == (NAMESPACE, ELEMENT):
                if found is not None:
                    raise PolicyError(f"{name}: more than one vmshare policy element")
                found = child
    if found is None:
        return None
    return _from_element(found, f"{name}: vmshare policy metadata")
