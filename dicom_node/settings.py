"""The node's configuration: one frozen, validated schema, loaded once at start.

Every key has its default here and nowhere else, so ``node.yaml`` documents the whole interface and the code
holds no hidden defaults. Unknown keys are rejected (a typo must not silently fall back to a default), and a bad
value fails at start with a message that names the key.

Environment variables override the file for containers: ``DICOM_NODE__NODE__AE_TITLE=FOO`` sets
``node.ae_title``; the value is parsed as YAML, so ``DICOM_NODE__STORAGE__FSYNC=false`` is a boolean.

Relative paths in the file are resolved against the file's own directory, so a config and the folders it names
can move together; with no file they are resolved against the working directory. The model spec and the model
repository, when the file leaves them out, are the bundled ones of the installation (:data:`INSTALL_ROOT`),
wherever the file lives.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "DICOM_NODE__"

AETitle = Annotated[
    str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*[^ ][\x20-\x5b\x5d-\x7e]*$")
]
"""An AE title: 1-16 characters of the default repertoire, no backslash, not all spaces (PS3.5 VR AE)."""

Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, the key and the cause."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsListener(_Section):
    """DICOM TLS (PS3.15 Annex B; TLS 1.2 or later, as BCP 195 asks) on a port of its own, beside the plain one
    (or instead of it, with ``only``)."""

    port: Port
    certificate: Path
    """The node's certificate (PEM; a chain, leaf first)."""
    private_key: Path
    """Its private key (PEM, not encrypted: the service starts unattended; keep the file readable by the node's
    user only)."""
    ca_certificates: Path | None = None
    """CA certificates (PEM) that sign the senders' certificates. A client certificate that none of them signed
    is refused; needed when ``require_client_certificate`` is true."""
    require_client_certificate: bool = True
    """Mutual authentication, as IHE ATNA asks of a secure node: a sender without a certificate signed by
    ``ca_certificates`` is refused during the handshake. False: a sender may come without a certificate (one it
    does present must still verify)."""
    only: bool = False
    """True: no plain listener on ``node.port``; associations are accepted over TLS only."""

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TlsListener:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError(
                "require_client_certificate is true (the default) but ca_certificates is not set: name the CA "
                "certificates that sign the senders' certificates, or set require_client_certificate: false"
            )
        return self


class AllowedCaller(_Section):
    """A calling AE title bound to the hosts it may call from."""

    ae_title: AETitle
    hosts: tuple[IPvAnyNetwork, ...] = Field(min_length=1)
    """IP addresses or CIDR networks (``10.1.2.3``, ``10.1.0.0/16``, ``fd00::/8``)."""


class NodeSection(_Section):
    """The DIMSE service the node offers."""

    ae_title: AETitle = "COVIDSEG"
    host: str = "0.0.0.0"
    port: Port = 11112
    max_associations: int = Field(10, ge=1, le=1000)
    allowed_calling_ae_titles: tuple[AETitle, ...] = ()
    """Empty: any calling AE title is accepted. Otherwise only these."""
    allowed_callers: tuple[AllowedCaller, ...] = ()
    """Calling AE titles bound to hosts: such a title is accepted only from one of its hosts. The titles count as
    known, as those of ``allowed_calling_ae_titles`` do: when either list is set, an AE title in neither is
    rejected."""
    tls: TlsListener | None = None
    """A DICOM TLS listener; none by default."""
    accept_other_sop_classes: bool = False
    """False: storage SOP classes other than CT / Enhanced CT are refused at negotiation. True: they are accepted,
    stored nowhere and answered Success, for senders that push whole studies."""
    max_pdu_size: int = Field(4_194_304, ge=0)
    """Largest P-DATA PDU we accept (0 = unlimited)."""
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)


class StorageSection(_Section):
    """Where received bytes and all durable state live."""

    dir: Path = Path("var")
    fsync: bool = True
    """fsync each received file and its directory before answering Success. Turning it off trades the promise
    that nothing acknowledged is lost on power failure for speed; keep it on in production."""
    min_free_bytes: int = Field(2 * 1024**3, ge=0)
    """Below this much free space in ``dir``, new instances are refused with Out of Resources (0xA700)."""
    reserve_bytes: int = Field(8 * 1024**2, ge=0)
    """Disk space the node holds in ``dir`` (a file) and gives up to the state database when the disk fills, so
    jobs can still be put back in the queue; reception answers 0xA700 meanwhile. 0 disables it."""


class SeriesSection(_Section):
    """When a series counts as complete."""

    quiet_seconds: float = Field(10.0, gt=0)
    """A series is complete this long after its last instance arrived."""
    complete_on_release: bool = True
    """Complete earlier, when the association that delivered it is released and its slices form a contiguous,
    evenly spaced stack."""
    on_new_instances_after_done: Literal["rerun", "ignore"] = "rerun"
    """Instances arriving for a series already processed: start a new run of it, or only store them."""
    poll_interval_s: float = Field(0.5, gt=0)


class SelectionSection(_Section):
    """Which complete series are processed; the others are recorded as skipped with the reason."""

    modalities: tuple[str, ...] = ("CT",)
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    """The first values of ImageType (0008,0008) a series must carry; empty disables the check."""
    axial_tolerance_deg: float = Field(30.0, ge=0, le=90)
    """Largest angle between the slice normal and the patient's head-foot axis for a series to count as axial."""
    min_slices: int = Field(8, ge=1)


class ReconstructionSection(_Section):
    """Policies for geometry that naive slice stacking gets wrong."""

    gantry_tilt: Literal["reject", "resample"] = "resample"
    """Slices sheared by gantry tilt: refuse the series, or resample onto a regular axial grid."""
    uneven_spacing: Literal["reject", "resample"] = "resample"
    """Missing or unevenly spaced slices: refuse, or resample onto the median spacing."""
    spacing_tolerance: float = Field(0.1, gt=0, lt=1)
    """Relative deviation of a slice step from the median step that still counts as even."""
    max_gap_slices: float = Field(3.0, ge=1)
    """With uneven_spacing=resample, a gap larger than this many median steps is still refused: interpolating
    across it would invent anatomy."""
    duplicate_positions: Literal["reject", "keep_latest"] = "keep_latest"
    """Two instances (different SOP Instance UIDs) at one position: refuse, or keep the later-acquired one."""
    decode_workers: int = Field(2, ge=1, le=64)
    predecode_cache_mb: int = Field(1024, ge=0)
    """Decode instances in the background as they arrive, keeping at most this many MB of decoded pixels until
    their job takes them; 0 decodes only when the job runs."""
    predecode_processes: int = Field(2, ge=0, le=16)
    """Worker processes that decode ahead, at low CPU priority (nice 10) so the associations still receiving keep
    the CPU; 0 decodes in the node's own threads, which contend with reception for the interpreter lock."""


class TritonSection(_Section):
    """How the node reaches Triton, and whether it starts one itself."""

    url: str = "127.0.0.1:8001"
    urls: tuple[str, ...] = ()
    """Several Triton servers (``host:port`` each) used as one fleet: requests go to the endpoint with the fewest in
    flight, an endpoint that fails is taken out and probed again with backoff. When set, ``url`` is not used and
    the node starts no server of its own."""
    protocol: Literal["grpc", "http"] = "grpc"
    managed: bool = True
    """Start a local tritonserver on ``model_repository`` when the URL is local and nothing answers there."""
    http_port: Port = 8000
    grpc_port: Port = 8001
    metrics_port: Port = 8002
    startup_timeout_s: float = Field(180.0, gt=0)
    request_timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(2, ge=0, le=10)
    """Bounded retries of a failed request (connection errors and timeouts only)."""
    max_in_flight: int = Field(2, ge=1, le=64)
    shared_memory: bool = False
    """Pass tensors through system shared memory (server on this host only)."""


class OnnxRuntimeSection(_Section):
    """In-process inference on the same ONNX file Triton serves."""

    intra_op_threads: int = Field(0, ge=0)
    """0: ONNX Runtime's default (one per physical core)."""


INSTALL_ROOT = Path(__file__).resolve().parent.parent
"""The installation's own folder (the checkout ``make install`` installs from): it holds the bundled model spec
(``config/``) and Triton model repository (``models/``)."""


class InferenceSection(_Section):
    backend: Literal["triton", "onnxruntime"] = "triton"
    config: Path = Path("config/config_inference.json")
    """The model spec. Left out of node.yaml: the bundled one, under the installation's folder, wherever node.yaml
    lives; written in node.yaml as a relative path: relative to node.yaml's folder."""
    model_repository: Path = Path("models")
    """The Triton model repository (ONNX Runtime reads the same file); resolved as ``config`` is."""
    triton: TritonSection = TritonSection()
    onnxruntime: OnnxRuntimeSection = OnnxRuntimeSection()


class BackoffPolicy(_Section):
    """How long to wait before trying again: ``initial_s`` after the first failure, doubling up to ``max_s``.

    The one retry schedule of the node: jobs (``workers.backoff``) and exports (``export.backoff``) use it.
    """

    initial_s: float = Field(gt=0)
    max_s: float = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> BackoffPolicy:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self

    def delay(self, failures: int) -> float:
        """Seconds before the next try after ``failures`` failed ones: initial * 2^(failures-1), capped."""
        return float(min(self.max_s, self.initial_s * (2 ** max(0, failures - 1))))


class WorkersSection(_Section):
    """The job queue's worker pool."""

    count: int = Field(1, ge=1, le=32)
    max_attempts: int = Field(3, ge=1, le=100)
    lease_seconds: float = Field(1800.0, gt=0)
    """A claimed job whose worker vanished (crash) goes back to the queue after this long."""
    backoff: BackoffPolicy = BackoffPolicy(initial_s=10.0, max_s=600.0)
    """Wait before a retryable failure of a job runs again, and between looks at an unavailable backend."""
    backend_max_wait_s: float = Field(3600.0, gt=0)
    """A job that finds the model backend unavailable (Triton down or unreachable) waits in the queue, spending
    no attempt, for at most this long; then it fails naming the backend. A backend that answers but refuses the
    work (wrong model, shapes) fails the job at once."""


class DestinationTls(_Section):
    """DICOM TLS towards a destination (the node as the TLS client)."""

    ca_certificates: Path
    """CA certificates (PEM) that sign the destination's certificate: a peer whose certificate they do not
    verify is not sent to."""
    certificate: Path | None = None
    """Our client certificate (PEM), for a destination that requires one; with ``private_key``."""
    private_key: Path | None = None
    check_hostname: bool = True
    """The destination's certificate must name ``host`` (a DNS name or IP address in its subjectAltName)."""

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: give both or neither")
        return self


class Destination(_Section):
    """A DICOM peer that receives every SEG the node writes."""

    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle | None = None
    """Our AE title towards this peer; defaults to node.ae_title."""
    tls: DestinationTls | None = None
    """Send over DICOM TLS; plain TCP when absent."""


class ExportSection(_Section):
    """The persistent outbox: each (SEG, destination) pair is retried on its own."""

    max_attempts: int = Field(8, ge=1, le=1000)
    backoff: BackoffPolicy = BackoffPolicy(initial_s=5.0, max_s=300.0)
    """Wait before a failed send to one destination is tried again."""
    timeout_s: float = Field(60.0, gt=0)
    workers: int = Field(2, ge=1, le=32)
    batch_size: int = Field(64, ge=1, le=1000)
    """Objects sent to one destination over one association (a job's SEG, SR and overlay images go together)."""


class SegSection(_Section):
    """The DICOM SEG the node writes."""

    series_number: int = Field(9901, ge=0, le=2**31 - 1)
    series_description: str = Field("AI ground-glass opacity (not for diagnostic use)", max_length=64)
    include_empty_frames: bool = False
    """False: one frame per source slice where the mask is non-empty. True: a frame for every source slice."""
    manufacturer: str = "dicom-node project"
    manufacturer_model_name: str = "dicom-node"
    device_serial_number: str = "0001"
    institution_name: str | None = None
    """The equipment identification of every object the node writes (SEG, SR, overlay images)."""


class SrSection(_Section):
    """The lesion-burden report: a TID 1500 measurement report (Enhanced SR) that references the SEG's segment.
    On by default: a few kilobytes that every archive stores and most viewers show as text."""

    enabled: bool = True
    series_number: int = Field(9902, ge=0, le=2**31 - 1)
    series_description: str = Field("AI ground-glass burden (not for diagnostic use)", max_length=64)


class OverlaySection(_Section):
    """Secondary Capture images of the CT in a lung window with the ground-glass outline and a banner burned in,
    for viewers that do not display SEG. Off by default: one uncompressed RGB image (about 0.8 MB for 512 x 512)
    per source slice with a finding is a lot to put in every study."""

    enabled: bool = False
    series_number: int = Field(9903, ge=0, le=2**31 - 1)
    series_description: str = Field("AI ground-glass overlay (not for diagnostic use)", max_length=64)
    all_slices: bool = False
    """False: an image for each source slice with a finding. True: an image for every source slice."""
    window_center: float = -600.0
    """The lung window the overlay images and the preview show the CT in (HU)."""
    window_width: float = Field(1500.0, gt=0)


class PreviewSection(_Section):
    """A PNG per job in its results folder (``preview.png``): key slices with the outline, and the numbers."""

    enabled: bool = True
    key_slices: int = Field(3, ge=1, le=12)
    """The slices with the largest ground-glass area (a job without a finding: evenly spaced through the
    lungs), in the lung window of ``overlay``."""


class PublishSection(_Section):
    """Optional MetaImage output per job, as the Clara operator wrote it."""

    output_dir: Path | None = None
    publish_dir: Path | None = None


_TlsFiles = TypeVar("_TlsFiles", TlsListener, DestinationTls)


def is_loopback(host: str) -> bool:
    """True when ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HttpSection(_Section):
    """The operations endpoints: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus) and the read-only status
    page at ``/``."""

    enabled: bool = False
    host: str = "127.0.0.1"
    """Loopback by default. Any other address needs ``access_token``."""
    port: Port = 8080
    access_token: SecretStr | None = None
    """When set, every request must carry it: ``Authorization: Bearer TOKEN`` (Prometheus, scripts) or HTTP Basic
    with the token as the password (a browser asks for it). At least 16 characters."""

    @field_validator("access_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("access_token must be at least 16 characters")
        return value

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> HttpSection:
        if self.enabled and not is_loopback(self.host) and self.access_token is None:
            raise ValueError(
                f"host {self.host!r} is not a loopback address: set http.access_token to serve beyond this machine "
                "(or bind http.host to 127.0.0.1)"
            )
        return self


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = False
    """One JSON object per line (for log shippers) instead of plain text."""


class Settings(_Section):
    """The whole node configuration (node.yaml)."""

    node: NodeSection = NodeSection()
    storage: StorageSection = StorageSection()
    series: SeriesSection = SeriesSection()
    selection: SelectionSection = SelectionSection()
    reconstruction: ReconstructionSection = ReconstructionSection()
    inference: InferenceSection = InferenceSection()
    workers: WorkersSection = WorkersSection()
    destinations: tuple[Destination, ...] = ()
    export: ExportSection = ExportSection()
    seg: SegSection = SegSection()
    sr: SrSection = SrSection()
    overlay: OverlaySection = OverlaySection()
    preview: PreviewSection = PreviewSection()
    publish: PublishSection = PublishSection()
    logging: LoggingSection = LoggingSection()
    http: HttpSection = HttpSection()

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        seen: set[tuple[str, str, int]] = set()
        for dest in value:
            key = (dest.ae_title, dest.host, dest.port)
            if key in seen:
                raise ValueError(f"destination {dest.ae_title}@{dest.host}:{dest.port} is listed twice")
            seen.add(key)
        return value

    def resolve_paths(self, base: Path, bundled: Path = INSTALL_ROOT) -> Settings:
        """Return a copy whose relative paths are anchored at ``base`` (the config file's folder), except the model
        spec and repository left at their defaults, which name the bundled ones under ``bundled``."""

        def anchor(p: Path | None, root: Path = base) -> Path | None:
            if p is None:
                return None
            return p if p.is_absolute() else (root / p).resolve()

        given = self.inference.model_fields_set
        inference = self.inference.model_copy(
            update={
                "config": anchor(self.inference.config, base if "config" in given else bundled),
                "model_repository": anchor(
                    self.inference.model_repository, base if "model_repository" in given else bundled
                ),
            }
        )

        def anchor_tls(tls: _TlsFiles | None) -> _TlsFiles | None:
            if tls is None:
                return None
            paths = ("certificate", "private_key", "ca_certificates")
            return tls.model_copy(update={k: anchor(getattr(tls, k)) for k in paths})

        return self.model_copy(
            update={
                "node": self.node.model_copy(update={"tls": anchor_tls(self.node.tls)}),
                "destinations": tuple(d.model_copy(update={"tls": anchor_tls(d.tls)}) for d in self.destinations),
                "storage": self.storage.model_copy(update={"dir": anchor(self.storage.dir)}),
                "inference": inference,
                "publish": self.publish.model_copy(
                    update={
                        "output_dir": anchor(self.publish.output_dir),
                        "publish_dir": anchor(self.publish.publish_dir),
                    }
                ),
            }
        )


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {name}: {'.'.join(keys)} conflicts with another override")
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment {name}: value is not valid YAML: {exc}") from exc
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def load_settings(path: Path | None, environ: dict[str, str] | None = None) -> Settings:
    """Load, override from the environment, validate and anchor paths. Raises ConfigError naming the key."""
    env = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    source = "embedded defaults"
    base = Path.cwd()
    if path is not None:
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
        base = path.resolve().parent
    overrides = _env_overrides(env)
    if overrides:
        data = _merge(data, overrides)
        source += " + environment"
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(source, exc)) from exc
    return settings.resolve_paths(base)
