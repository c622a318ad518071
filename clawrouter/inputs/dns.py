"""DNS that checks what it returns, so aiohttp connects to exactly the addresses we approved.

Resolving once and handing aiohttp only checked addresses closes DNS rebinding: there is no
second lookup between the check and the connect. The hostname stays in the URL, so Host, SNI
and certificate verification are unchanged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from .addresses import AddressRule, IPAddress


def idna_host(url: URL) -> bool:
    """Whether IDNA both decodes the URL's host (`url.host`) and encodes it, as `getaddrinfo`
    does with what aiohttp resolves (`url.raw_host`). An empty or over-long label, or a bad
    `xn--` one, raises UnicodeError in either: a ValueError, which aiohttp passes on as it is,
    not the OSError of a failed lookup. Callers refuse such a URL before fetching it."""
    try:
        url.host  # noqa: B018 - decoded on access
        (url.raw_host or "").encode("idna")
    except UnicodeError:
        return False
    return True


class AddressRefused(Exception):
    """A host resolved to an address the rule forbids.

    Deliberately not an OSError: aiohttp wraps OSErrors from the resolver into connection
    errors, and this one must reach the fetcher intact to become a `url_refused`.
    """

    def __init__(self, host: str, address: IPAddress) -> None:
        super().__init__(f"{host} resolves to {address}")
        self.host = host
        self.address = address


class CheckingResolver(AbstractResolver):
    """Wrap a resolver; refuse the whole name if any of its addresses is forbidden.

    One bad address is enough: aiohttp may try them in any order, and a name that mixes a public
    and a private address is a classic rebinding setup.
    """

    def __init__(self, inner: AbstractResolver, allowed: AddressRule | None,
                 *, owns_inner: bool = False) -> None:
        self._inner = inner
        self._allowed = allowed
        self._owns_inner = owns_inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not results:
            raise OSError(f"{host} has no addresses")
        if self._allowed is not None:
            for result in results:
                address = ipaddress.ip_address(result["host"])
                if not self._allowed(address):
                    raise AddressRefused(host, address)
        return results

    async def close(self) -> None:
        if self._owns_inner:
            await self._inner.close()


class OwnThreadsResolver(AbstractResolver):
    """`getaddrinfo` on a few threads of its own. The name in a user's URL may sit on a name
    server that never answers, and a lookup cannot be cancelled once it runs: here it ties up
    only these threads, never the event loop's default pool (file reads, the image store) nor
    libuv's (the upstream's own lookups). When all are busy, further lookups wait their turn,
    within the fetch's total timeout."""

    def __init__(self, threads: int = 4) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="input-dns")

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        infos = await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                                       flags=socket.AI_ADDRCONFIG))
        return [ResolveResult(hostname=host, host=str(address[0]), port=int(address[1]),
                              family=af, proto=proto,
                              flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
                for af, _, proto, _, address in infos if af in (socket.AF_INET, socket.AF_INET6)]

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
