"""Reading http(s) image URLs, for servers started with --allow-remote-images (off by default).

The server then makes requests that clients name, so every hop of a fetch is checked (`RemoteImagePolicy`):
- the host must be in `--allowed-media-domains` when that list is given (exact names, as vLLM's option);
- every address the host resolves to must be public: loopback, private, link-local, multicast, reserved,
  shared (CGNAT) and cloud metadata addresses are refused, also inside IPv4-mapped, 6to4, Teredo and NAT64
  IPv6 addresses;
- the connection goes to the address that was checked (the URL's host travels in the Host header, and for
  https in the TLS SNI, so the certificate is still verified against the name): a DNS answer that changes
  between the check and the connection cannot redirect it;
- redirects are followed by hand, at most 3, each hop checked again;
- one time limit for the whole fetch, DNS and redirects included (a server that trickles a byte now and then
  is cut at the limit), and a byte limit on the body (sent as is: no compressed encodings).
Every failure gives the client the same message, so it cannot tell a closed port from a 404 or a refused
address; the server's log line says which it was.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from vtw_core.serve.errors import bad_request
from vtw_core.serve.limits import SERVER_MAX_IMAGE_BYTES

READ_ERROR = "the image URL could not be read"
TIMEOUT_S = 10.0
MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Cloud instance metadata and platform endpoints; most are link-local or private anyway, some are not.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS Time Sync over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure's platform endpoint (a public address)
    )
)
BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "192.0.0.0/24",  # IETF protocol assignments
        "198.18.0.0/15",  # benchmarking
        "64:ff9b:1::/48",  # local-use NAT64
    )
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(address: IPAddress) -> bool:
    """Whether a server may fetch from this address: a global unicast address, not a metadata endpoint."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if address.teredo is not None:
            embedded = address.teredo[1]
        if address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
    if address in METADATA_ADDRESSES or any(address in network for network in BLOCKED_NETWORKS):
        return False
    return address.is_global and not (
        address.is_multicast
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_unspecified
    )


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (in a thread: getaddrinfo blocks)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


Resolver = Callable[[str, int], Awaitable[list[str]]]


def parse_domains(text: str | None) -> frozenset[str]:
    """`a.com,b.org` -> the host names (lower case, no trailing dot); ValueError for anything but names."""
    names = frozenset(name.strip().lower().rstrip(".") for name in (text or "").split(",") if name.strip())
    for name in names:
        labels = name.split(".")
        if not name.isascii() or not all(label and len(label) <= 63 and label.replace("-", "").isalnum()
                                         for label in labels):  # fmt: skip
            raise ValueError(
                f"{name!r} is not a domain name (write example.com, without a scheme or a path; "
                "international names in their xn-- form)"
            )
    return names


class FetchRefused(Exception):
    """Why a fetch failed, for the server's log; the client only reads READ_ERROR."""


@dataclass(frozen=True)
class RemoteImagePolicy:
    """What a server may fetch. Tests inject `allow_address` (to reach 127.0.0.1), `resolve` and `transport`."""

    allowed_domains: frozenset[str] = frozenset()  # empty: any host whose addresses are public
    timeout_s: float = TIMEOUT_S  # the whole fetch, every hop and the DNS lookups included
    max_bytes: int = SERVER_MAX_IMAGE_BYTES
    max_redirects: int = MAX_REDIRECTS
    allow_address: Callable[[IPAddress], bool] = is_public_address
    resolve: Resolver = system_resolver
    transport: httpx.AsyncBaseTransport | None = field(default=None, compare=False)


async def fetch_image(url: str, policy: RemoteImagePolicy | None = None, *, param: str | None = None) -> bytes:
    """The bytes at `url` within the policy's limits, or a 400 with READ_ERROR whatever went wrong."""
    policy = policy or RemoteImagePolicy()
    try:
        return await asyncio.wait_for(_fetch(url, policy), policy.timeout_s)
    except asyncio.TimeoutError:
        reason = f"took more than {policy.timeout_s:g} s"
    except FetchRefused as error:
        reason = str(error)
    except (httpx.HTTPError, OSError, ValueError, UnicodeError) as error:
        reason = f"{type(error).__name__}: {str(error)[:200]}"
    failure = bad_request(READ_ERROR, param=param, code="invalid_image")
    failure.detail = f"{_host_of(url)}: {reason}"
    raise failure


def _host_of(url: str) -> str:
    try:
        return httpx.URL(url).host or "?"
    except (httpx.InvalidURL, ValueError, TypeError):
        return "?"


async def _fetch(url: str, policy: RemoteImagePolicy) -> bytes:
    current = httpx.URL(url)
    timeout = httpx.Timeout(policy.timeout_s)  # a backstop: the caller's deadline cuts first
    async with httpx.AsyncClient(transport=policy.transport, timeout=timeout, follow_redirects=False,
                                 trust_env=False) as client:  # fmt: skip
        for _ in range(policy.max_redirects + 1):
            request = await _checked_request(client, current, policy)
            response = await client.send(request, stream=True)
            try:
                if response.status_code in REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchRefused(f"HTTP {response.status_code} without a Location")
                    current = current.join(location)
                    continue
                if response.status_code != 200:
                    raise FetchRefused(f"HTTP {response.status_code}")
                return await _body(response, policy.max_bytes)
            finally:
                await response.aclose()
    raise FetchRefused(f"more than {policy.max_redirects} redirects")


async def _checked_request(client: httpx.AsyncClient, url: httpx.URL, policy: RemoteImagePolicy) -> httpx.Request:
    """A GET to the checked address of `url`'s host, with the host name in the Host header and TLS SNI."""
    if url.scheme not in ("http", "https"):
        raise FetchRefused(f"scheme {url.scheme!r}")
    host = url.raw_host.decode("ascii").lower().rstrip(".")  # IDNA-encoded, as DNS and the allowlist read it
    if not host or url.userinfo:
        raise FetchRefused("no host, or credentials in the URL")
    if policy.allowed_domains and host not in policy.allowed_domains:
        raise FetchRefused(f"{host} is not in the allowed domains")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(host)]  # a literal address: nothing to resolve
    except ValueError:
        addresses = [ipaddress.ip_address(address.split("%")[0]) for address in await policy.resolve(host, port)]
    if not addresses:
        raise FetchRefused(f"{host} has no address")
    refused = [address for address in addresses if not policy.allow_address(address)]
    if refused:  # one bad answer is enough: mixed answers are how rebinding attacks hide
        raise FetchRefused(f"{host} resolves to a refused address ({refused[0]})")
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    target = url.copy_with(host=str(addresses[0]))
    headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*", "Accept-Encoding": "identity"}
    return client.build_request("GET", target, headers=headers, extensions=extensions)


async def _body(response: httpx.Response, max_bytes: int) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchRefused(f"content encoding {encoding!r}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchRefused(f"{declared} bytes declared")
    data = bytearray()
    async for chunk in response.aiter_bytes():  # identity encoding: the bytes as sent
        data.extend(chunk)
        if len(data) > max_bytes:
            raise FetchRefused(f"more than {max_bytes} bytes")
    return bytes(data)
