"""Which network addresses a webhook may reach, and a name resolver for the sender that only yields those.

The same policy runs when a task is created (an early 400) and again when a delivery connects: the
send-time check resolves the host, checks every address and connects to a checked address itself, so a
DNS answer that changes between the check and the connection (DNS rebinding) cannot reach a refused one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

# Cloud metadata services: refused even when private targets are allowed.
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
# Address classes TEXTGEN_WEBHOOK_ALLOW_PRIVATE lifts; the others are never a sensible webhook target.
_PRIVATE_CLASSES = frozenset({"loopback", "private", "link-local", "reserved"})


class RefusedDestination(Exception):
    """A webhook URL whose host is, or resolves to, an address the policy refuses."""


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Resolve ``host`` with the system resolver, off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in out:
            out.append(address)
    return out


# IPv6 prefixes that carry an IPv4 address inside them; the embedded address decides the class.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 form wraps (mapped, compatible, 6to4, Teredo, NAT64), with its form's name."""
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    if address.teredo is not None:
        # Teredo carries the relay server and the client's (obfuscated) address; either may be internal.
        server, client = address.teredo
        inner = client if address_class(server) is None else server
        return "Teredo", inner
    for network in _NAT64:
        if address in network:
            return "NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _IPV4_COMPATIBLE and int(address) > 1:
        return "IPv4-compatible", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_class(address: IPAddress) -> str | None:
    """The refused class an address belongs to (``loopback``, ``metadata``...), or None if public.

    An IPv6 address that wraps an IPv4 one (IPv4-mapped or -compatible, 6to4, Teredo, NAT64) takes the
    class of the address it wraps, named with its form (``6to4 loopback``); Teredo and 6to4 relays are
    refused outright, since they tunnel to whatever they wrap.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address in _SITE_LOCAL:
            return "site-local"
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            form, inner = embedded
            inner_class = address_class(inner)
            if form == "IPv4-mapped":
                return inner_class
            return f"{form} {inner_class}" if inner_class else form
    if address in _METADATA:
        return "metadata"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "reserved"
    return None


def literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class AddressPolicy:
    """Decides which hosts a webhook may reach; ``resolver`` is replaceable (tests simulate DNS with it)."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        resolver: Resolver = system_resolver,
        resolve_timeout: float = 5.0,
        refused_ports: frozenset[int] = frozenset(),  # the server passes TEXTGEN_WEBHOOK_REFUSED_PORTS
    ) -> None:
        self.allow_private = allow_private
        self.refused_ports = refused_ports
        self.resolver = resolver
        self.resolve_timeout = resolve_timeout

    def check_address(self, host: str, address: IPAddress) -> None:
        kind = address_class(address)
        if kind is None or (self.allow_private and kind in _PRIVATE_CLASSES):
            return
        # The class only: quoting how this server's DNS resolved a name would tell the client about
        # the server's network.
        shown = "" if literal_address(host) == address else " resolves to an address that"
        raise RefusedDestination(
            f"host {host!r}{shown} is a {kind} address; webhooks only go to public addresses"
        )

    def check_port(self, port: int) -> None:
        if port in self.refused_ports:
            raise RefusedDestination(f"port {port} is refused for webhooks (an internal service port)")

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of ``host``, all checked; refuses when any of them is refused."""
        self.check_port(port)
        literal = literal_address(host)
        if literal is not None:
            addresses: list[IPAddress] = [literal]
        else:
            try:
                async with asyncio.timeout(self.resolve_timeout):
                    addresses = await self.resolver(host, port)
            except (OSError, TimeoutError) as exc:
                raise RefusedDestination(f"host {host!r} could not be resolved") from exc
            if not addresses:
                raise RefusedDestination(f"host {host!r} could not be resolved")
        for address in addresses:
            self.check_address(host, address)
        return addresses

    async def check_url(self, url: str) -> None:
        """Create-time check of a webhook URL (scheme and credentials are checked by the request schema).

        With private targets allowed (development), a name that does not resolve yet is accepted: the
        send-time check still applies to whatever it resolves to later.
        """
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
        try:
            await self.resolve(host, port)
        except RefusedDestination as exc:
            if self.allow_private and isinstance(exc.__cause__, (OSError, TimeoutError)):
                return
            raise


class GuardedResolver(AbstractResolver):
    """aiohttp's name resolution for webhooks: a name resolves only to addresses the policy allows, checked on
    every new connection (the connector keeps no DNS cache), so a name that later resolves elsewhere (DNS
    rebinding) is refused at send time. aiohttp keeps the URL's host name for TLS (SNI and certificate checks)
    and in the ``Host`` header; only the TCP connection goes to the checked address. aiohttp does not ask the
    resolver about a literal IP address: ``WebhookSender.send`` checks those itself."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in await self.policy.resolve(host, port)
        ]

    async def close(self) -> None:
        return None
