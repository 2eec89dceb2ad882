"""The model specification: everything about the model and its transforms, as data (config_inference.json).

Training code (models/training) reads this same file, so training and inference transforms cannot drift apart.
Spatial triples are always (x, y, z) as in the JSON; numpy arrays from SimpleITK are (z, y, x), and the code that
moves between the two says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from inference.errors import SpecError

Layout = Literal["NCXYZ", "NCZYX"]
"""Tensor layout of the model: batch, channel, then spatial axes in x,y,z (MONAI/Clara convention) or z,y,x."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: Literal["FP32", "FP16"]
    layout: Layout


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    version: str
    onnx_file: str
    """File name of the ONNX model inside ``<repository>/<name>/<version>/``."""
    input: TensorSpec
    output: TensorSpec
    output_channels: int

    def onnx_path(self, repository: Path) -> Path:
        return repository / self.name / self.version / self.onnx_file


@dataclass(frozen=True, slots=True)
class IntensitySpec:
    a_min: float
    a_max: float
    b_min: float
    b_max: float
    clip: bool


@dataclass(frozen=True, slots=True)
class PreSpec:
    spacing_mm: tuple[float, float, float]
    interpolation: Literal["linear", "nearest", "bspline"]
    intensity: IntensitySpec


@dataclass(frozen=True, slots=True)
class InfererSpec:
    roi_size: tuple[int, int, int]
    """(x, y, z) voxels."""
    overlap: float
    mode: Literal["gaussian", "constant"]
    sigma_scale: float
    batch_size: int
    padding_value: float
    windows: Literal["all", "lung_fields"] = "all"
    """``lung_fields``: when the lung-fields step is on, only the whole grid's windows that cover the lung fields'
    bounding box run (``pipeline.lattice_cover``), and of those only the ones a lung field lies under; the rest
    are background anyway. ``all``: the whole grid."""


@dataclass(frozen=True, slots=True)
class LungFieldSpec:
    """Labels outside the lung fields become background (see ``inference.lung_fields`` for the recipe)."""

    max_hu: float
    """Blocks at or below this mean HU are lung (or airway, or ground glass)."""
    min_volume_ml: float
    """Smaller enclosed air (bowel gas, a stray pocket) is not lung."""
    block_mm: float
    """In-plane block size the mask is computed on."""
    margin_mm: float
    """In-plane growth of the mask, so haze against the pleura is kept whole."""


@dataclass(frozen=True, slots=True)
class PostSpec:
    activation: Literal["softmax", "sigmoid"]
    """softmax: argmax over the output channels. sigmoid: one channel, label 1 where p >= threshold."""
    threshold: float
    restore_interpolation: Literal["nearest"]
    lung_fields: LungFieldSpec | None = None
    """None (the key absent): labels are kept wherever the model puts them."""


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    label: int
    name: str


@dataclass(frozen=True, slots=True)
class InferenceSpec:
    model: ModelSpec
    pre: PreSpec
    inferer: InfererSpec
    post: PostSpec
    segments: tuple[SegmentSpec, ...]
    source: Path | None = None


def _req(obj: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: expected an object")
    if key not in obj:
        raise SpecError(f"{where}.{key}: missing")
    return obj[key]


def _triple(value: Any, where: str, cast: type) -> tuple[Any, Any, Any]:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise SpecError(f"{where}: expected 3 values (x, y, z), got {value!r}")
    try:
        out = tuple(cast(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from exc
    if any(v <= 0 for v in out):
        raise SpecError(f"{where}: values must be positive, got {value!r}")
    return out  # type: ignore[return-value]


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> Any:
    if value not in allowed:
        raise SpecError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _lung_fields(value: Any, where: str) -> LungFieldSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected an object, got {value!r}")
    unknown = set(value) - {"max_hu", "min_volume_ml", "block_mm", "margin_mm"}
    if unknown:
        raise SpecError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    try:
        out = LungFieldSpec(
            max_hu=float(_req(value, "max_hu", where)),
            min_volume_ml=float(_req(value, "min_volume_ml", where)),
            block_mm=float(_req(value, "block_mm", where)),
            margin_mm=float(_req(value, "margin_mm", where)),
        )
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from exc
    if out.block_mm <= 0 or out.min_volume_ml < 0 or out.margin_mm < 0:
        raise SpecError(f"{where}: block_mm must be > 0, min_volume_ml and margin_mm >= 0")
    return out


def parse_spec(data: dict[str, Any], source: Path | None = None) -> InferenceSpec:
    """Validate a decoded config_inference.json. Raises SpecError naming the key."""
    w = str(source) if source else "config_inference"
    m = _req(data, "model", w)
    mi = _req(m, "input", f"{w}.model")
    mo = _req(m, "output", f"{w}.model")
    model = ModelSpec(
        name=str(_req(m, "name", f"{w}.model")),
        version=str(m.get("version", "1")),
        onnx_file=str(m.get("onnx_file", "model.onnx")),
        input=TensorSpec(
            name=str(_req(mi, "name", f"{w}.model.input")),
            datatype=_choice(mi.get("datatype", "FP32"), ("FP32", "FP16"), f"{w}.model.input.datatype"),
            layout=_choice(mi.get("layout", "NCXYZ"), ("NCXYZ", "NCZYX"), f"{w}.model.input.layout"),
        ),
        output=TensorSpec(
            name=str(_req(mo, "name", f"{w}.model.output")),
            datatype=_choice(mo.get("datatype", "FP32"), ("FP32", "FP16"), f"{w}.model.output.datatype"),
            layout=_choice(mo.get("layout", "NCXYZ"), ("NCXYZ", "NCZYX"), f"{w}.model.output.layout"),
        ),
        output_channels=int(_req(mo, "channels", f"{w}.model.output")),
    )
    p = _req(data, "pre_transforms", w)
    it = _req(p, "intensity", f"{w}.pre_transforms")
    pre = PreSpec(
        spacing_mm=_triple(_req(p, "spacing_mm", f"{w}.pre_transforms"), f"{w}.pre_transforms.spacing_mm", float),
        interpolation=_choice(
            p.get("interpolation", "linear"), ("linear", "nearest", "bspline"), f"{w}.pre_transforms.interpolation"
        ),
        intensity=IntensitySpec(
            a_min=float(_req(it, "a_min", f"{w}.pre_transforms.intensity")),
            a_max=float(_req(it, "a_max", f"{w}.pre_transforms.intensity")),
            b_min=float(it.get("b_min", 0.0)),
            b_max=float(it.get("b_max", 1.0)),
            clip=bool(it.get("clip", True)),
        ),
    )
    if pre.intensity.a_max <= pre.intensity.a_min:
        raise SpecError(f"{w}.pre_transforms.intensity: a_max must be greater than a_min")
    i = _req(data, "inferer", w)
    inferer = InfererSpec(
        roi_size=_triple(_req(i, "roi_size", f"{w}.inferer"), f"{w}.inferer.roi_size", int),
        overlap=float(i.get("overlap", 0.25)),
        mode=_choice(i.get("mode", "gaussian"), ("gaussian", "constant"), f"{w}.inferer.mode"),
        sigma_scale=float(i.get("sigma_scale", 0.125)),
        batch_size=int(i.get("batch_size", 1)),
        padding_value=float(i.get("padding_value", 0.0)),
        windows=_choice(i.get("windows", "all"), ("all", "lung_fields"), f"{w}.inferer.windows"),
    )
    if not 0.0 <= inferer.overlap < 1.0:
        raise SpecError(f"{w}.inferer.overlap: must be in [0, 1), got {inferer.overlap}")
    if inferer.batch_size < 1:
        raise SpecError(f"{w}.inferer.batch_size: must be >= 1")
    if inferer.sigma_scale <= 0:
        raise SpecError(f"{w}.inferer.sigma_scale: must be > 0")
    q = _req(data, "post_transforms", w)
    post = PostSpec(
        activation=_choice(q.get("activation", "softmax"), ("softmax", "sigmoid"), f"{w}.post_transforms.activation"),
        threshold=float(q.get("threshold", 0.5)),
        restore_interpolation=_choice(
            q.get("restore_interpolation", "nearest"), ("nearest",), f"{w}.post_transforms.restore_interpolation"
        ),
        lung_fields=_lung_fields(q.get("lung_fields"), f"{w}.post_transforms.lung_fields"),
    )
    if post.activation == "softmax" and model.output_channels < 2:
        raise SpecError(
            f"{w}: softmax/argmax needs >= 2 output channels, model.output.channels is {model.output_channels}"
        )
    if post.activation == "sigmoid" and model.output_channels != 1:
        raise SpecError(
            f"{w}: sigmoid/threshold needs 1 output channel, model.output.channels is {model.output_channels}"
        )
    segs = _req(data, "segments", w)
    if not isinstance(segs, list) or not segs:
        raise SpecError(f"{w}.segments: expected a non-empty list")
    segments = tuple(
        SegmentSpec(label=int(_req(s, "label", f"{w}.segments[{k}]")), name=str(_req(s, "name", f"{w}.segments[{k}]")))
        for k, s in enumerate(segs)
    )
    return InferenceSpec(model=model, pre=pre, inferer=inferer, post=post, segments=segments, source=source)


def load_spec(path: Path) -> InferenceSpec:
    """Read and validate config_inference.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: inference configuration not found") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: cannot read inference configuration: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{path}: top level must be an object")
    return parse_spec(data, source=path)
