"""Which connection a result URL is downloaded over.

The upstream's own origin goes through its pooled session: the user chose that host (the
sandbox, or an upstream on the LAN, may well sit on a private address). Any other host — a CDN,
or wherever a compromised upstream points — is reached only at public addresses, judged like
input URLs at connect time (no DNS rebinding), unless `allow_private_urls`: a paid answer must
not be able to make the gateway send requests into the user's network. Redirects are judged
hop by hop (`download` asks again for each).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from clawrouter.inputs.addresses import AddressRule, address_problem, parse_literal_ip
from clawrouter.inputs.urls import guarded_session
from clawrouter.store.download import DownloadRefused


def _origin(url: URL) -> tuple[str, str, int | None]:
    return url.scheme, (url.host or "").lower().rstrip("."), url.port


class ResultSources:
    """A `download.Getter`: `get(url)` on the right session. `aclose()` closes its own.

    `upstream` is the trusted origin and its session (the gateway's upstream); without it every
    host is judged (the CLI fetching a result the gateway could not store).
    """

    def __init__(self, allowed: AddressRule | None, *,
                 upstream: tuple[str, aiohttp.ClientSession] | None = None,
                 connect_timeout: float = 5.0, dns: AbstractResolver | None = None) -> None:
        self._origin = _origin(URL(upstream[0])) if upstream else None
        self._upstream = upstream[1] if upstream else None
        self._allowed = allowed  # None: any address (allow_private_urls)
        self._connect_timeout = connect_timeout
        self._dns = dns  # tests answer every name with private addresses
        self._guarded: aiohttp.ClientSession | None = None

    def get(self, url: URL, **kwargs: Any) -> Any:
        if self._upstream is not None and _origin(url) == self._origin:
            return self._upstream.get(url, **kwargs)
        if self._allowed is not None:
            try:
                literal = parse_literal_ip(url.host or "")
            except ValueError:
                raise DownloadRefused(f"{url.host!r} is not a canonical IP address") from None
            if literal is not None and not self._allowed(literal):
                problem = address_problem(literal) or "not an allowed"
                raise DownloadRefused(f"{literal} is a {problem} address")
        if self._guarded is None:
            self._guarded = guarded_session(self._allowed, dns=self._dns,
                                            connect_timeout=self._connect_timeout)
        return self._guarded.get(url, **kwargs)

    async def aclose(self) -> None:
        if self._guarded is not None:
            session, self._guarded = self._guarded, None
            await session.close()
