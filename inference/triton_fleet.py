"""Several Triton servers as one backend: requests spread by least requests in flight, with failover.

Hospitals that outgrow one box run Triton as a fleet (several servers, or Triton behind a Kubernetes service).
Each endpoint is a :class:`~inference.triton_backend.TritonBackend` of its own. A request goes to the healthy
endpoint with the fewest requests in flight (ties: the one used longest ago). An endpoint that refuses, times
out or reports not ready (``BackendUnavailable``) is taken out and probed again (``check()``) after a backoff
that doubles from ``probe_initial_s`` to ``probe_max_s``; the request is tried again on another endpoint, so a
job does not fail while one endpoint is healthy. When none is, ``BackendUnavailable`` names every endpoint and
why. A model error (``ModelMismatch``, a failed inference) is not an outage and is raised as it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inference.errors import BackendUnavailable
from inference.triton_backend import TritonBackend

log = logging.getLogger(__name__)


@dataclass
class EndpointState:
    """What the fleet knows of one endpoint (read by metrics and logs)."""

    url: str
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    healthy: bool = False
    down_until: float = 0.0
    """While unhealthy: when to probe it again."""
    probe_delay_s: float = 0.0
    reason: str = ""
    last_used: float = 0.0


class TritonFleet:
    """A Backend over several Triton endpoints (see the module docstring). Thread-safe."""

    name = "triton"

    def __init__(
        self,
        endpoints: Sequence[TritonBackend],
        *,
        probe_initial_s: float = 1.0,
        probe_max_s: float = 30.0,
    ) -> None:
        if not endpoints:
            raise ValueError("a Triton fleet needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.states = [EndpointState(e.url) for e in self.endpoints]
        self.probe_initial_s = probe_initial_s
        self.probe_max_s = probe_max_s
        self.max_in_flight = sum(e.max_in_flight for e in self.endpoints)
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    # -- health ------------------------------------------------------------------------------------------
    def _mark_down(self, k: int, reason: str) -> None:
        with self._lock:
            st = self.states[k]
            was_healthy = st.healthy
            st.healthy = False
            st.failures += 1
            st.probe_delay_s = min(self.probe_max_s, max(self.probe_initial_s, st.probe_delay_s * 2))
            st.down_until = time.monotonic() + st.probe_delay_s
            st.reason = reason
        if was_healthy:
            log.warning("Triton endpoint %s taken out (probed again in %.1f s): %s", st.url, st.probe_delay_s, reason)

    def _probe(self, k: int) -> bool:
        """``check()`` endpoint ``k``: healthy again, or down for longer."""
        try:
            self.endpoints[k].check()
        except BackendUnavailable as exc:
            self._mark_down(k, str(exc))
            return False
        with self._lock:
            st = self.states[k]
            recovered = not st.healthy and st.failures > 0
            st.healthy, st.probe_delay_s, st.reason = True, 0.0, ""
        if recovered:
            log.info("Triton endpoint %s is back", st.url)
        return True

    def check(self) -> None:
        """Check every endpoint; ready when at least one is. A model mismatch on any endpoint is raised."""
        for k in range(len(self.endpoints)):
            self._probe(k)
        if not any(st.healthy for st in self.states):
            raise self._none_healthy()

    def _none_healthy(self) -> BackendUnavailable:
        reasons = "; ".join(f"{st.url}: {st.reason or 'not ready'}" for st in self.states)
        return BackendUnavailable(f"no Triton endpoint is available ({len(self.states)} configured): {reasons}")

    # -- requests ----------------------------------------------------------------------------------------
    def _pick(self, tried: set[int]) -> int | None:
        """The healthy endpoint with the fewest requests in flight, probing those whose backoff has passed."""
        now = time.monotonic()
        with self._lock:
            due = [k for k, st in enumerate(self.states) if not st.healthy and st.down_until <= now and k not in tried]
        for k in due:  # outside the lock: a probe is a network call
            self._probe(k)
        with self._lock:
            candidates = [k for k, st in enumerate(self.states) if st.healthy and k not in tried]
            if not candidates:
                return None
            k = min(candidates, key=lambda i: (self.states[i].in_flight, self.states[i].last_used))
            st = self.states[k]
            st.in_flight += 1
            st.requests += 1
            st.last_used = now
            return k

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        tried: set[int] = set()
        while True:
            k = self._pick(tried)
            if k is None:
                raise self._none_healthy()
            try:
                return self.endpoints[k].infer(batch)
            except BackendUnavailable as exc:
                tried.add(k)
                self._mark_down(k, str(exc))
            finally:
                with self._lock:
                    self.states[k].in_flight -= 1

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()


__all__ = ["EndpointState", "TritonFleet"]
