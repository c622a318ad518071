"""Which IP addresses a URL fetch may reach: public ones only, so a request cannot probe the LAN,
the gateway's own host or a cloud metadata service (169.254.169.254)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressRule = Callable[[IPAddress], bool]

# Not globally reachable (IANA special-purpose registries), whatever this Python's tables say:
# 3.11 before 3.11.10 (and 3.12 before 3.12.4) call 192.0.0.8 global; none refuses fec0::/10.
_NOT_GLOBAL = (ipaddress.IPv4Network("192.0.0.0/24"), ipaddress.IPv6Network("fec0::/10"),
               ipaddress.IPv6Network("3fff::/20"))
_GLOBAL_EXCEPTIONS = (ipaddress.IPv4Address("192.0.0.9"), ipaddress.IPv4Address("192.0.0.10"))
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: RFC 8215's local-use NAT64 prefix: translated by some local network's gateway, in whatever
#: address layout it chose, so where it leads cannot be read from the address
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def address_problem(ip: IPAddress) -> str | None:
    """Why `ip` may not be fetched (e.g. "loopback"), or None when it is public.

    IPv6 forms that carry an IPv4 address (`::ffff:127.0.0.1`, 6to4, NAT64) are judged by the
    IPv4 address inside, which is where the packets end up.
    """
    if ip in _LOCAL_NAT64:
        return "non-public"
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return address_problem(embedded)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if any(ip in net for net in _NOT_GLOBAL) and ip not in _GLOBAL_EXCEPTIONS:
        return "non-public"
    if not ip.is_global:  # shared 100.64/10, benchmarking, documentation, …
        return "non-public"
    return None


def is_public_address(ip: IPAddress) -> bool:
    """The default rule for URL fetches."""
    return address_problem(ip) is None


def parse_literal_ip(host: str) -> IPAddress | None:
    """The address a URL host names literally, None for a DNS name.

    Raises ValueError for hosts that look numeric but are not canonical (`2130706433`, `127.1`,
    `0x7f.1`): socket libraries map those onto addresses too, so they must never reach one
    unchecked. "Looks numeric" mirrors aiohttp's own test for skipping the resolver.
    """
    if ":" not in host and not host.replace(".", "").isdigit():
        return None
    return ipaddress.ip_address(host)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None
