"""The `keda` backend: KEDA (through the external scaler) starts and stops replicas; this side
only finds them. A headless Service's DNS name resolves to its ready pods; each new address
is probed on `/v2/health/ready` and joins the rotation when it answers 200, and leaves it when
it disappears from DNS or stops answering (its requests in flight finish)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping

import aiohttp

from ember.activator.service import Service
from ember.activator.throttler import Replica

log = logging.getLogger("ember.activator")

Resolve = Callable[[str, int], Awaitable[set[str]]]


async def resolve_addresses(host: str, port: int) -> set[str]:
    """Every IPv4/IPv6 address of `host`; empty when the name does not resolve (a headless
    Service with no ready pod has no records)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return set()
    return {str(info[4][0]) for info in infos}


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class DnsBackend:
    def __init__(
        self,
        services: Mapping[str, Service],
        *,
        host_template: str,
        http_port: int,
        grpc_port: int,
        interval_s: float = 1.0,
        probe_timeout_s: float = 1.0,
        resolve: Resolve = resolve_addresses,
    ) -> None:
        self.services = services
        self.host_template = host_template
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.resolve = resolve
        # model -> ip -> Replica once it is in rotation, None while not yet ready.
        self._seen: dict[str, dict[str, Replica | None]] = {name: {} for name in services}

    def host(self, model: str) -> str:
        return self.host_template.format(model=model)

    # -- Backend -------------------------------------------------------------------------------

    def starting(self, model: str) -> int:
        return sum(1 for replica in self._seen[model].values() if replica is None)

    def scale(self, service: Service, desired: int) -> None:
        """Nothing to do here: KEDA reads the decision through the external scaler."""

    def replicas(self, model: str) -> list[dict[str, object]]:
        return [
            {
                "address": _address(ip, self.http_port),
                "state": "ready" if replica is not None else "starting",
                "in_flight": replica.in_flight if replica is not None else 0,
            }
            for ip, replica in sorted(self._seen[model].items())
        ]

    # -- the discovery loop --------------------------------------------------------------------

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.probe_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.gather(
                    *(self.refresh(service, session) for service in self.services.values())
                )
                await asyncio.sleep(self.interval_s)

    async def refresh(self, service: Service, session: aiohttp.ClientSession) -> None:
        """One round for one model: resolve, probe every address, update the rotation."""
        seen = self._seen[service.name]
        found = await self.resolve(self.host(service.name), self.http_port)
        for ip in set(seen) - found:
            self._leave(service, ip, "gone from DNS")
        ips = sorted(found)
        healthy = await asyncio.gather(*(self._probe(session, ip) for ip in ips))
        for ip, ok in zip(ips, healthy, strict=True):
            replica = seen.get(ip)
            if ok and replica is None:
                replica = Replica(_address(ip, self.http_port), _address(ip, self.grpc_port))
                seen[ip] = replica
                service.throttler.add(replica)
                log.info("replica ready", extra={"model": service.name, "address": ip})
            elif not ok and replica is not None:
                self._leave(service, ip, "readiness probe failed")
                seen[ip] = None
            else:
                seen.setdefault(ip, None)

    def _leave(self, service: Service, ip: str, why: str) -> None:
        replica = self._seen[service.name].pop(ip, None)
        if replica is not None:
            service.throttler.take_out(replica.address)
            log.info("replica left", extra={"model": service.name, "address": ip, "why": why})

    async def _probe(self, session: aiohttp.ClientSession, ip: str) -> bool:
        url = f"http://{_address(ip, self.http_port)}/v2/health/ready"
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with session.get(url) as answer:
                return answer.status == 200
        return False
