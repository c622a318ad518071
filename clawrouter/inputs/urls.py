"""Fetch an http(s) image URL without letting it reach an internal address or fill memory.

Every hop (the first URL and each redirect target) is checked before it is requested: scheme,
credentials, literal IPs here, DNS names in `CheckingResolver` at connect time. Redirects are
followed by hand so that check runs on each one. The body is read up to the cap plus one byte,
in a second step (`OpenedUrl.read`), so the gateway can wait for memory for it first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from ..capped import TooLarge, read_capped
from .addresses import AddressRule, IPAddress, address_problem, parse_literal_ip
from .dns import AddressRefused, CheckingResolver, OwnThreadsResolver, idna_host
from .image import check_size
from .policy import InputPolicy
from .refusals import URL_FETCH_FAILED, URL_REFUSED, refuse, shorten

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class UrlFetcher:
    """One pooled aiohttp session, created on first use, whose connector uses checked DNS."""

    def __init__(self, policy: InputPolicy, *, dns: AbstractResolver | None,
                 allowed: AddressRule | None) -> None:
        self._policy = policy
        self._dns = dns
        self._allowed = allowed  # None: no address check (allow_private_urls)
        self._session: aiohttp.ClientSession | None = None

    async def open(self, url: str, *, param: str) -> OpenedUrl:
        """Follow `url` to its image's response and stop before the body, so the caller can
        wait for memory for it (`OpenedUrl.size`) first; a declared size over the cap is
        refused here. Only time spent fetching counts towards `total_timeout`."""
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self._policy.total_timeout):
                response, shown = await self._follow(url, param=param)
        except TimeoutError:
            _timed_out(url, self._policy.total_timeout, param=param)
        left = self._policy.total_timeout - (asyncio.get_running_loop().time() - started)
        return OpenedUrl(response, url=url, shown=shown, param=param, cap=self._policy.max_bytes,
                         total_timeout=self._policy.total_timeout, time_left=left)

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _follow(self, url: str, *, param: str) -> tuple[aiohttp.ClientResponse, str]:
        """The 2xx response `url` leads to, its body unread, and how to show its last hop."""
        target = self._checked(_parse(url, param=param), param=param)
        for hop in range(self._policy.max_redirects + 1):
            shown = _display(str(target))
            with _refusing(shown, param=param):
                response = await self._get_session().get(target, allow_redirects=False)
            try:
                if response.status in _REDIRECTS:
                    target = self._next_hop(response, hop, param=param)
                elif not 200 <= response.status < 300:
                    refuse(f"{shown} answered HTTP {response.status}", param=param,
                           code=URL_FETCH_FAILED)
                else:
                    if response.content_length is not None:
                        check_size(response.content_length, max_bytes=self._policy.max_bytes,
                                   param=param)
                    return response, shown
            except BaseException:
                response.close()  # not release(): the rest of the body must not be drained
                raise
            response.release()
        raise AssertionError("unreachable: _next_hop refuses past max_redirects")

    def _next_hop(self, response: aiohttp.ClientResponse, hop: int, *, param: str) -> URL:
        if hop >= self._policy.max_redirects:
            refuse(f"more than {self._policy.max_redirects} redirects", param=param,
                   code=URL_REFUSED)
        location = response.headers.get("Location")
        if not location:
            refuse(f"{_display(str(response.url))} redirected without a Location", param=param,
                   code=URL_FETCH_FAILED)
        return self._checked(response.url.join(_parse(location, param=param)), param=param)

    def _checked(self, url: URL, *, param: str) -> URL:
        """Refuse what can be judged from the URL alone; DNS names are judged when resolved."""
        shown = _display(str(url))
        if url.scheme not in ("http", "https"):
            refuse(f"only http and https URLs are fetched, not {shorten(url.scheme, 20)!r}",
                   param=param, code=URL_REFUSED)
        if url.user is not None or url.password is not None:
            refuse(f"URLs with credentials are refused ({shown})", param=param, code=URL_REFUSED)
        if not idna_host(url):
            refuse(f"malformed host name in {shown}", param=param, code=URL_REFUSED)
        host = url.host
        if not host:
            refuse(f"URL has no host ({shown})", param=param, code=URL_REFUSED)
        try:
            literal = parse_literal_ip(host)
        except ValueError:
            refuse(f"{shorten(host)!r} is not a canonical IP address", param=param,
                   code=URL_REFUSED)
        if literal is not None and self._allowed is not None and not self._allowed(literal):
            refuse(f"refused to fetch {shown}: {literal} is {_describe(literal)}",
                   param=param, code=URL_REFUSED)
        return url

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = guarded_session(self._allowed, dns=self._dns,
                                            connect_timeout=self._policy.connect_timeout)
        return self._session


class OpenedUrl:
    """A fetched image's response whose body is not read yet."""

    def __init__(self, response: aiohttp.ClientResponse, *, url: str, shown: str, param: str,
                 cap: int, total_timeout: float, time_left: float) -> None:
        self._response = response
        self._url = url  # as asked for; `shown` is the last hop, for messages
        self._shown = shown
        self._param = param
        self._cap = cap
        self._total_timeout = total_timeout
        self._time_left = time_left
        #: what reading the body will hold: its declared length, or the cap without one
        self.size = cap if response.content_length is None else response.content_length

    async def read(self) -> bytes:
        """The body, at most the cap; refused if it is bigger or takes too long."""
        try:
            async with asyncio.timeout(max(self._time_left, 0.0)):
                with _refusing(self._shown, param=self._param):
                    return await _read_capped(self._response, self._cap, param=self._param)
        except TimeoutError:
            _timed_out(self._url, self._total_timeout, param=self._param)
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection unless the body was read to its end (then it is back in the
        pool already). Idempotent."""
        self._response.close()


@contextmanager
def _refusing(shown: str, *, param: str) -> Iterator[None]:
    """Turn a failed connection or transfer into the refusal that says what went wrong."""
    try:
        yield
    except AddressRefused as exc:
        refuse(f"refused to fetch {shown}: {exc.host} resolves to {exc.address}, "
               f"{_describe(exc.address)}", param=param, code=URL_REFUSED)
    except aiohttp.ServerTimeoutError:
        refuse(f"connecting to {shown} timed out", param=param, code=URL_FETCH_FAILED)
    except aiohttp.ClientConnectorDNSError:
        refuse(f"could not resolve the host of {shown}", param=param, code=URL_FETCH_FAILED)
    except aiohttp.ClientConnectorError:
        refuse(f"could not connect to {shown}", param=param, code=URL_FETCH_FAILED)
    except (aiohttp.ClientError, OSError) as exc:
        refuse(f"fetching {shown} failed ({type(exc).__name__})", param=param,
               code=URL_FETCH_FAILED)


def _timed_out(url: str, total: float, *, param: str) -> NoReturn:
    refuse(f"fetching {_display(url)} took longer than {total:g} s", param=param,
           code=URL_FETCH_FAILED)


#: what to do instead, by `address_problem`; none for link-local (cloud metadata) and the rest
_ADVICE = {
    "loopback": " (this machine: send the image's path or bytes instead; this gateway's own "
                "/images/ URLs are read from its store)",
    "private": " (set allow_private_urls to fetch from your own network: it lets the URLs "
               "clients send reach every non-public address, this machine's included)",
}


def _describe(address: IPAddress) -> str:
    problem = address_problem(address)
    article = "an" if problem and problem[0] in "aeiou" else "a"
    kind = f"{article} {problem} address" if problem else "an address outside the allowed set"
    return kind + _ADVICE.get(problem or "", "")


def guarded_session(allowed: AddressRule | None, *, dns: AbstractResolver | None = None,
                    connect_timeout: float = 5.0) -> aiohttp.ClientSession:
    """A session that connects only to addresses `allowed` approves (None: any), judged at
    connect time on the addresses actually used. Names only: a literal IP in a URL never
    reaches the resolver, so callers check those themselves (`address_problem`)."""
    resolver = CheckingResolver(dns or OwnThreadsResolver(), allowed, owns_inner=dns is None)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False),
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                      sock_connect=connect_timeout),
        # Compressed bodies would slip past the byte cap when inflated; ask for none
        # and never inflate (a gzip body then fails the image sniff).
        auto_decompress=False,
        headers={"Accept-Encoding": "identity", "User-Agent": "clawrouter"},
        cookie_jar=aiohttp.DummyCookieJar(),  # no state carried between users' fetches
        trust_env=False,  # an env proxy would connect to addresses we never checked
    )


async def _read_capped(response: aiohttp.ClientResponse, cap: int, *, param: str) -> bytes:
    """The body, refused once it passes the cap; any failure drops the connection."""
    try:
        return await read_capped(response, cap)
    except BaseException as exc:
        response.close()  # not release(): the rest of the body must not be drained
        if isinstance(exc, TooLarge):
            check_size(cap + 1, max_bytes=cap, param=param)  # refuses: more than the cap came
        raise


def _parse(url: str, *, param: str) -> URL:
    try:
        return URL(url)
    except (ValueError, TypeError):
        refuse(f"malformed URL {_display(url)!r}", param=param, code=URL_REFUSED)


def _display(url: str) -> str:
    """The URL as echoed in messages: credentials removed, length bounded."""
    try:
        parsed = URL(url)
        if parsed.user is not None or parsed.password is not None:
            url = str(parsed.with_user(None))
    except (ValueError, TypeError):
        pass
    return shorten(url)
