"""Triton Inference Server backend, through tritonclient: gRPC by default, HTTP as an option.

- Tensors travel as binary data only (HTTP: ``binary_data=True`` on inputs and outputs; gRPC is binary by
  nature), or through system shared memory when the server is on this host (``shared_memory=True``).
- Thread-safe: the sliding window calls ``infer`` from several threads; at most ``max_in_flight`` requests are
  in flight, each on a slot of its own (an HTTP client, shared-memory regions). The gRPC client is thread-safe
  and shared; the HTTP client (gevent) is not, so each slot has its own.
- ``check()`` reads the model's repository state, metadata and configuration from the server and raises
  ``ModelMismatch`` when the model is missing or not ready, or its names, data types, ranks, channel counts or
  window shape disagree with the spec; ``BackendUnavailable`` when the server cannot be reached (naming the URL).
- Each request has a timeout; connection errors and timeouts (only those, never a model error) are retried a
  bounded number of times, then reported as ``BackendUnavailable``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from inference.errors import BackendUnavailable, InferenceError, ModelMismatch
from inference.spec import InferenceSpec, TensorSpec

log = logging.getLogger(__name__)

Protocol_ = Literal["grpc", "http"]
T = TypeVar("T")

_NP_TYPES: dict[str, type[np.floating[Any]]] = {"FP32": np.float32, "FP16": np.float16}
_RETRYABLE_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}
_counter = itertools.count()


def normalize_url(url: str) -> str:
    """tritonclient wants ``host:port``; accept and drop a scheme (``grpc://``, ``http://``) and a trailing slash."""
    return url.split("://", 1)[-1].rstrip("/")


def _message(exc: BaseException) -> str:
    from tritonclient.utils import InferenceServerException

    text = str(exc.message() or exc) if isinstance(exc, InferenceServerException) else str(exc)
    text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return text


def is_retryable(exc: BaseException) -> bool:
    """Connection errors and timeouts: the server may answer a second time. Model errors are not retried."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        if status in _RETRYABLE_GRPC:
            return True
        # tritonclient.http wraps nothing: connection problems arrive as OSError below. Its own timeout text:
        return "timed out" in str(exc.message() or "").lower()
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    # gevent.Timeout (tritonclient.http's network timeout) derives from BaseException, not from OSError.
    return any(c.__module__.startswith("gevent") and c.__name__ == "Timeout" for c in type(exc).__mro__)


def _make_client(protocol: Protocol_, url: str, connect_timeout_s: float, request_timeout_s: float) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as grpcclient

            return grpcclient.InferenceServerClient(url=url)
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(
            url=url, connection_timeout=connect_timeout_s, network_timeout=request_timeout_s
        )
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BackendUnavailable(f"Triton at {url}: tritonclient[{protocol}] is not installed: {exc}") from exc
    except Exception as exc:
        raise BackendUnavailable(f"Triton at {url} ({protocol}): cannot create a client: {_message(exc)}") from exc


def server_error(url: str, protocol: Protocol_ = "grpc", timeout_s: float = 2.0) -> str | None:
    """None when a Triton server answers live at ``url``, else why not (one line). Never raises."""
    url = normalize_url(url)
    client: Any = None
    try:
        client = _make_client(protocol, url, timeout_s, timeout_s)
        live = client.is_server_live(client_timeout=timeout_s) if protocol == "grpc" else client.is_server_live()
        return None if live else "the server answers but is not live"
    except Exception as exc:
        return _message(exc)
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def server_live(url: str, protocol: Protocol_ = "grpc", timeout_s: float = 2.0) -> bool:
    """Does a Triton server answer at ``url``? Never raises; returns within about ``timeout_s``."""
    return server_error(url, protocol, timeout_s) is None


@dataclass
class _Region:
    name: str
    handle: Any
    byte_size: int


class _Worker:
    """One thread owning one HTTP client: tritonclient.http runs on gevent, whose sockets cannot change threads."""

    def __init__(self, factory: Callable[[], Any], name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        try:
            self.client = self._pool.submit(factory).result()
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.client.close)
        self._pool.shutdown(wait=True)


@dataclass
class _Slot:
    """What one request in flight owns: its shared-memory regions and, for HTTP, its client's thread."""

    index: int
    worker: _Worker | None = None
    regions: dict[str, _Region] = field(default_factory=dict)


class TritonBackend:
    """A model served by Triton. Construct, ``check()``, then ``infer()`` from any number of threads."""

    name = "triton"

    def __init__(
        self,
        spec: InferenceSpec,
        url: str,
        *,
        protocol: Protocol_ = "grpc",
        request_timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        retries: int = 2,
        retry_backoff_s: float = 0.5,
        max_in_flight: int = 2,
        shared_memory: bool = False,
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
        if max_in_flight < 1 or retries < 0:
            raise ValueError("max_in_flight must be >= 1 and retries >= 0")
        self.spec = spec
        self.url = normalize_url(url)
        self.protocol: Protocol_ = protocol
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = min(connect_timeout_s, request_timeout_s)
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.max_in_flight = max_in_flight
        self.shared_memory = shared_memory
        self.model_name = spec.model.name
        self.model_version = spec.model.version
        self._where = f"model {self.model_name!r} on Triton at {self.url} ({protocol})"
        self._lock = threading.Lock()
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self._free: list[_Slot] = []
        self._slots: list[_Slot] = []
        self._slot_ids = itertools.count()
        # Every region gets a name never used before: an unregister that timed out may still hold the old name on
        # the server, and re-registering that name would fail with ALREADY_EXISTS.
        self._region_ids = itertools.count()
        self._grpc_client: Any = None
        self._http_control: _Worker | None = None
        self._checked = False
        self._closed = False
        self._shm_prefix = f"dicomnode_{os.getpid()}_{next(_counter)}"

    # -- clients -------------------------------------------------------------------------------------------
    def _new_client(self) -> Any:
        return _make_client(self.protocol, self.url, self.connect_timeout_s, self.request_timeout_s)

    def _shared_grpc(self) -> Any:
        """The gRPC client (thread-safe, shared by every thread)."""
        with self._lock:
            if self._closed:
                raise InferenceError(f"{self._where}: backend is closed")
            if self._grpc_client is None:
                self._grpc_client = self._new_client()
            return self._grpc_client

    def _client_call(self, client: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """A control-plane call on ``client`` bounded by the connect timeout."""
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.connect_timeout_s
        return getattr(client, method)(*args, **kwargs)

    def _control(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Metadata and registration calls: gRPC on the shared client, HTTP on the control thread's client."""
        if self.protocol == "grpc":
            return self._client_call(self._shared_grpc(), method, *args, **kwargs)
        with self._lock:
            if self._closed:
                raise InferenceError(f"{self._where}: backend is closed")
            if self._http_control is None:
                self._http_control = _Worker(self._new_client, "triton-http-control")
            worker = self._http_control
        return worker.run(lambda: self._client_call(worker.client, method, *args, **kwargs))

    def _acquire(self) -> _Slot:
        self._in_flight.acquire()
        try:
            with self._lock:
                if self._closed:
                    raise InferenceError(f"{self._where}: backend is closed")
                if self._free:
                    return self._free.pop()
                slot = _Slot(index=next(self._slot_ids))
                self._slots.append(slot)
            if self.protocol == "http":
                try:
                    slot.worker = _Worker(self._new_client, f"triton-http-{slot.index}")
                except BaseException:
                    with self._lock:
                        self._slots.remove(slot)
                    raise
            return slot
        except BaseException:
            self._in_flight.release()
            raise

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            self._free.append(slot)
        self._in_flight.release()

    # -- check ---------------------------------------------------------------------------------------------
    def check(self) -> None:
        try:
            live = self._control("is_server_live")
        except InferenceError:
            raise
        except Exception as exc:
            raise BackendUnavailable(f"Triton at {self.url} ({self.protocol}) is unreachable: {_message(exc)}") from exc
        if not live:
            raise BackendUnavailable(f"Triton at {self.url} ({self.protocol}) answers but is not live")
        try:
            index = self._repository_index()
            present = sorted({str(m.get("name")) for m in index})
            if self.model_name not in present:
                raise ModelMismatch(
                    f"{self._where}: the server has no such model in its repository "
                    f"(it has: {', '.join(present) or 'none'})"
                )
            if not self._control("is_model_ready", self.model_name, self.model_version):
                states = [
                    f"version {m.get('version') or '?'} {m.get('state') or 'UNKNOWN'}"
                    + (f" ({m.get('reason')})" if m.get("reason") else "")
                    for m in index
                    if m.get("name") == self.model_name
                ]
                raise ModelMismatch(
                    f"{self._where}: version {self.model_version} is not ready ({'; '.join(states) or 'not loaded'})"
                )
            metadata = self._control("get_model_metadata", self.model_name, self.model_version, **self._json_kw())
            config = self._control("get_model_config", self.model_name, self.model_version, **self._json_kw())
        except InferenceError:
            raise
        except Exception as exc:
            if is_retryable(exc):
                raise BackendUnavailable(f"{self._where}: server stopped answering: {_message(exc)}") from exc
            raise ModelMismatch(f"{self._where}: cannot read the model's metadata: {_message(exc)}") from exc
        metadata = metadata if isinstance(metadata, dict) else {}
        config = config if isinstance(config, dict) else {}
        self._validate(metadata, config.get("config", config))
        if self.shared_memory:
            self._probe_shared_memory()
        self._checked = True

    def _json_kw(self) -> dict[str, Any]:
        return {"as_json": True} if self.protocol == "grpc" else {}

    def _repository_index(self) -> list[dict[str, Any]]:
        raw = self._control("get_model_repository_index", **self._json_kw())
        models = raw.get("models", []) if isinstance(raw, dict) else raw
        return [m for m in models if isinstance(m, dict)]

    def _validate(self, metadata: dict[str, Any], config: dict[str, Any]) -> None:
        spec = self.spec
        model = spec.model
        source = str(spec.source) if spec.source else "the inference configuration"
        tensors = {
            "input": {str(t["name"]): t for t in metadata.get("inputs", [])},
            "output": {str(t["name"]): t for t in metadata.get("outputs", [])},
        }
        for role, tensor in (("input", model.input), ("output", model.output)):
            served = tensors[role]
            if tensor.name not in served:
                raise ModelMismatch(
                    f"{self._where}: tensor names do not match: {source} names {role} {tensor.name!r}, "
                    f"the model's {role}s are {', '.join(repr(n) for n in sorted(served)) or 'none'}"
                )
            self._validate_tensor(role, tensor, served[tensor.name], source)
        max_batch = int(config.get("max_batch_size", 0) or 0)
        batch = spec.inferer.batch_size
        if max_batch > 0 and batch > max_batch:
            raise ModelMismatch(
                f"{self._where}: max_batch_size is {max_batch}, smaller than {source}'s inferer.batch_size {batch}"
            )

    def _validate_tensor(self, role: str, tensor: TensorSpec, served: dict[str, Any], source: str) -> None:
        spec = self.spec
        name = tensor.name
        datatype = str(served.get("datatype", ""))
        if datatype != tensor.datatype:
            raise ModelMismatch(
                f"{self._where}: {role} {name!r} has data type {datatype}, {source} says {tensor.datatype}"
            )
        shape = [int(d) for d in served.get("shape", [])]
        if len(shape) != 5:
            raise ModelMismatch(
                f"{self._where}: {role} {name!r} has shape {shape} (rank {len(shape)}); layout {tensor.layout} of "
                f"{source} needs rank 5 (batch, channel, 3 spatial)"
            )
        expected_channels = 1 if role == "input" else spec.model.output_channels
        if shape[1] not in (-1, expected_channels):
            what = "1 (one CT channel)" if role == "input" else f"{expected_channels} (model.output.channels)"
            raise ModelMismatch(
                f"{self._where}: {role} {name!r} has {shape[1]} channels (shape {shape}); {source} needs {what}"
            )
        roi = spec.inferer.roi_size if tensor.layout == "NCXYZ" else tuple(reversed(spec.inferer.roi_size))
        if any(d not in (-1, r) for d, r in zip(shape[2:], roi, strict=True)):
            raise ModelMismatch(
                f"{self._where}: {role} {name!r} has spatial shape {shape[2:]}, windows of {source} are "
                f"{list(roi)} ({tensor.layout})"
            )
        batch = spec.inferer.batch_size
        if shape[0] != -1 and not (shape[0] == 1 and batch == 1):
            raise ModelMismatch(
                f"{self._where}: {role} {name!r} has a fixed batch dimension {shape[0]}; {source} sends batches of "
                f"up to {batch} windows (use max_batch_size or a variable first dimension)"
            )

    # -- shared memory -------------------------------------------------------------------------------------
    def _probe_shared_memory(self) -> None:
        """Register a small region once, so a server on another host fails now with a clear message."""
        from tritonclient.utils import shared_memory as shm

        name = f"{self._shm_prefix}_probe"
        with self._lock:
            handle = shm.create_shared_memory_region(name, "/" + name, 64, create_only=True)
        try:
            self._control("register_system_shared_memory", name, "/" + name, 64)
            self._control("unregister_system_shared_memory", name)
        except Exception as exc:
            raise BackendUnavailable(
                f"Triton at {self.url}: system shared memory is on but the server cannot map this host's "
                f"shared memory (is it on another host, or in a container without this /dev/shm?): {_message(exc)}"
            ) from exc
        finally:
            with self._lock:
                shm.destroy_shared_memory_region(handle)

    def _slot_client(self, slot: _Slot) -> Any:
        """The client a slot's request uses; for HTTP only valid on the slot's own thread."""
        return slot.worker.client if slot.worker is not None else self._shared_grpc()

    def _region(self, slot: _Slot, role: str, byte_size: int) -> _Region:
        """The slot's region for ``role``, (re)created and registered when too small. Runs on the slot's thread."""
        from tritonclient.utils import shared_memory as shm

        region = slot.regions.get(role)
        if region is not None and region.byte_size >= byte_size:
            return region
        if region is not None:
            del slot.regions[role]
            self._drop_region(region, self._slot_client(slot))
        with self._lock:  # tritonclient's region bookkeeping is a plain module-level dict
            name = f"{self._shm_prefix}_{slot.index}_{role}_{next(self._region_ids)}"
            handle = shm.create_shared_memory_region(name, "/" + name, byte_size, create_only=True)
        region = _Region(name=name, handle=handle, byte_size=byte_size)
        try:
            self._client_call(self._slot_client(slot), "register_system_shared_memory", name, "/" + name, byte_size)
        except Exception:
            with self._lock:
                shm.destroy_shared_memory_region(handle)
            raise
        slot.regions[role] = region
        return region

    def _drop_region(self, region: _Region, client: Any) -> None:
        from tritonclient.utils import shared_memory as shm

        try:
            self._client_call(client, "unregister_system_shared_memory", region.name)
        except Exception as exc:  # the server keeps its mapping until it restarts; the local region goes anyway
            log.warning("%s: could not unregister shared memory %r: %s", self._where, region.name, _message(exc))
        with self._lock, contextlib.suppress(Exception):
            shm.destroy_shared_memory_region(region.handle)

    def _drop_regions(self, slot: _Slot, client: Any) -> None:
        for region in slot.regions.values():
            self._drop_region(region, client)
        slot.regions.clear()

    # -- infer ---------------------------------------------------------------------------------------------
    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if not self._checked:
            self.check()
        array = np.ascontiguousarray(batch, dtype=_NP_TYPES[self.spec.model.input.datatype])
        slot = self._acquire()
        try:
            if slot.worker is not None:
                return slot.worker.run(self._infer_with_retry, slot, array)
            return self._infer_with_retry(slot, array)
        finally:
            self._release(slot)

    def _infer_with_retry(self, slot: _Slot, array: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        attempt = 0
        while True:
            try:
                return self._infer_once(slot, array)
            except InferenceError:
                raise
            except BaseException as exc:  # gevent.Timeout is a BaseException
                if not isinstance(exc, Exception) and not is_retryable(exc):
                    raise
                if not is_retryable(exc):
                    raise InferenceError(
                        f"{self._where}: inference on a batch of shape {list(array.shape)} failed: {_message(exc)}"
                    ) from exc
                if attempt >= self.retries:
                    raise BackendUnavailable(
                        f"{self._where}: no answer after {attempt + 1} attempt(s) "
                        f"(timeout {self.request_timeout_s:g} s): {_message(exc)}"
                    ) from exc
                attempt += 1
                log.warning("%s: %s; retry %d of %d", self._where, _message(exc), attempt, self.retries)
                if self.shared_memory:
                    # A request that timed out may still write into the old regions: start on fresh ones.
                    self._drop_regions(slot, self._slot_client(slot))
                time.sleep(self.retry_backoff_s * attempt)

    def _infer_once(self, slot: _Slot, array: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        model = self.spec.model
        client = self._slot_client(slot)
        if self.protocol == "grpc":
            import tritonclient.grpc as tc

            inp = tc.InferInput(model.input.name, list(array.shape), model.input.datatype)
            out = tc.InferRequestedOutput(model.output.name)
            extra: dict[str, Any] = {"client_timeout": self.request_timeout_s}
        else:
            import tritonclient.http as tc  # type: ignore[no-redef]

            inp = tc.InferInput(model.input.name, list(array.shape), model.input.datatype)
            out = tc.InferRequestedOutput(model.output.name, binary_data=True)
            extra = {}
        out_dtype = _NP_TYPES[model.output.datatype]
        if self.shared_memory:
            from tritonclient.utils import shared_memory as shm

            out_shape = [array.shape[0], model.output_channels, *array.shape[2:]]
            out_bytes = int(np.prod(out_shape)) * np.dtype(out_dtype).itemsize
            in_region = self._region(slot, "input", array.nbytes)
            out_region = self._region(slot, "output", out_bytes)
            shm.set_shared_memory_region(in_region.handle, [array])
            inp.set_shared_memory(in_region.name, array.nbytes)
            out.set_shared_memory(out_region.name, out_bytes)
        elif self.protocol == "grpc":
            inp.set_data_from_numpy(array)
        else:
            inp.set_data_from_numpy(array, binary_data=True)
        result = client.infer(self.model_name, [inp], model_version=self.model_version, outputs=[out], **extra)
        if self.shared_memory:
            info = result.get_output(model.output.name)
            if info is None:
                raise ModelMismatch(f"{self._where}: the response has no output {model.output.name!r}")
            shape = [int(d) for d in (info["shape"] if isinstance(info, dict) else info.shape)]
            view = shm.get_contents_as_numpy(out_region.handle, out_dtype, shape)
            output = np.array(view, dtype=np.float32, copy=True)
            del view
            return output
        raw = result.as_numpy(model.output.name)
        if raw is None:
            raise ModelMismatch(f"{self._where}: the response has no output {model.output.name!r}")
        converted: npt.NDArray[np.float32] = np.asarray(raw).astype(np.float32, copy=False)
        return converted if converted.flags.writeable else converted.copy()

    # -- close ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister and free shared memory, close clients and their threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots, self._slots, self._free = self._slots, [], []
            grpc_client, self._grpc_client = self._grpc_client, None
            control, self._http_control = self._http_control, None
        for slot in slots:
            if slot.worker is not None:
                worker = slot.worker
                with contextlib.suppress(Exception):
                    worker.run(self._drop_regions, slot, worker.client)
                worker.close()
            elif grpc_client is not None:
                self._drop_regions(slot, grpc_client)
        if control is not None:
            control.close()
        if grpc_client is not None:
            with contextlib.suppress(Exception):
                grpc_client.close()
        self._checked = False

    def __enter__(self) -> TritonBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
