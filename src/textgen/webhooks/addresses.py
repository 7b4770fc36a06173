"""Which network addresses a webhook may reach, and a connection backend that only reaches those.

The same policy runs when a task is created (an early 400) and again when a delivery connects: the
send-time check resolves the host, checks every address and connects to a checked address itself, so a
DNS answer that changes between the check and the connection (DNS rebinding) cannot reach a refused one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore

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


def address_class(address: IPAddress) -> str | None:
    """The refused class an address belongs to (``loopback``, ``metadata``...), or None if public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
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


def _literal(host: str) -> IPAddress | None:
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
    ) -> None:
        self.allow_private = allow_private
        self.resolver = resolver
        self.resolve_timeout = resolve_timeout

    def check_address(self, host: str, address: IPAddress) -> None:
        kind = address_class(address)
        if kind is None or (self.allow_private and kind in _PRIVATE_CLASSES):
            return
        shown = "" if _literal(host) == address else f" resolves to {address}, which"
        raise RefusedDestination(
            f"host {host!r}{shown} is a {kind} address; webhooks only go to public addresses"
        )

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of ``host``, all checked; refuses when any of them is refused."""
        literal = _literal(host)
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
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            await self.resolve(host, port)
        except RefusedDestination as exc:
            if self.allow_private and isinstance(exc.__cause__, (OSError, TimeoutError)):
                return
            raise


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses the policy allows, resolving the name itself.

    httpcore keeps the URL's host name for TLS (SNI and certificate checks) and httpx keeps it in the
    ``Host`` header; only the TCP connection goes to the checked address.
    """

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.policy.resolve(host, port)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise RefusedDestination("webhooks never connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)
