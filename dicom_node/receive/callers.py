"""Who may call the node: calling AE titles, and the hosts some of them are bound to.

``node.allowed_calling_ae_titles`` lists titles accepted from anywhere; ``node.allowed_callers`` binds titles to
IP addresses or networks. Together they are the known titles: when either list is set, a title in neither is
rejected (pynetdicom does that at negotiation, "calling AE title not recognised"). A title bound to hosts is
accepted only from one of them, even if the plain list names it too (the stricter rule wins): an AE title is a
label any sender can claim, the address it calls from is harder to fake.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from dicom_node.settings import NodeSection

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class CallerPolicy:
    known: frozenset[str]
    """Every calling AE title that may associate; empty: any."""
    bound: Mapping[str, tuple[Network, ...]]
    """Titles that may call only from these networks."""

    @classmethod
    def from_settings(cls, node: NodeSection) -> CallerPolicy:
        bound: dict[str, tuple[Network, ...]] = {}
        for caller in node.allowed_callers:
            bound[caller.ae_title] = bound.get(caller.ae_title, ()) + tuple(caller.hosts)
        return cls(frozenset(node.allowed_calling_ae_titles) | frozenset(bound), bound)

    def host_refusal(self, ae_title: str, address: str) -> str | None:
        """Why ``ae_title`` may not call from ``address`` (None: it may, as far as hosts go)."""
        networks = self.bound.get(ae_title.strip())
        if networks is None:
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return f"calling AE title {ae_title.strip()!r} from an unparseable address {address!r}"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in networks):
            return None
        allowed = ", ".join(str(n) for n in networks)
        return f"calling AE title {ae_title.strip()!r} from {ip} is bound to {allowed} (node.allowed_callers)"
