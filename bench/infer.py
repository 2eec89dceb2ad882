"""Benchmark of the file-mode inference path: where the time and the memory go, per stage.

For lung1 (512 x 512 x 48) and for a 512 x 512 x 300 volume made from it (lung1 and its z-flip stacked, lung1's
spacing kept), each in a fresh process: read, resample, normalise, tiling, model compute, blending, labels,
restore, write; peak RSS; and the ratio (total - model compute) / model compute (target <= 0.10), and peak
memory against 4 x the float32 resampled volume plus the model's own working set.

    python bench/infer.py [--backend onnxruntime|triton] [--cases lung1,big] [--model PATH.onnx]

The model is the committed models/segmentation_ct_covid_lesion_v1/1/model.onnx when there is one, else a
random-weight SegResNet of the same architecture exported by tests/model_export.py (needs torch + MONAI): the cost
does not depend on the weights. Inputs are written as uncompressed MetaImage into bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"
LUNG1 = REPO.parent / "shared" / "data" / "chest_ct_volumes" / "lung1_image.nrrd"
STAGES = (
    "read",
    "resample",
    "normalise",
    "lung_fields",
    "tiling",
    "model_compute",
    "blending",
    "labels",
    "restore",
    "write",
)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _prepare_inputs() -> dict[str, Path]:
    import numpy as np
    import SimpleITK as sitk

    cases = {"lung1": OUT / "input_lung1" / "lung1.mhd", "big": OUT / "input_big" / "lung1_x300.mhd"}
    if all(p.is_file() for p in cases.values()):
        return cases
    lung1 = sitk.ReadImage(str(LUNG1))
    cases["lung1"].parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(lung1, str(cases["lung1"]))
    arr = sitk.GetArrayFromImage(lung1)
    stack, flip = [], False
    while sum(a.shape[0] for a in stack) < 300:
        stack.append(arr[::-1] if flip else arr)
        flip = not flip
    big = sitk.GetImageFromArray(np.ascontiguousarray(np.concatenate(stack)[:300]))
    big.SetSpacing(lung1.GetSpacing())
    big.SetOrigin(lung1.GetOrigin())
    big.SetDirection(lung1.GetDirection())
    cases["big"].parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(big, str(cases["big"]))
    return cases


def _model_repository(model: Path | None) -> Path:
    repo = OUT / "model_repository"
    onnx = repo / "segmentation_ct_covid_lesion_v1" / "1" / "model.onnx"
    if model is not None:
        from tests.model_export import build_model_repository

        build_model_repository(repo)
        onnx.write_bytes(model.read_bytes())
    elif not onnx.is_file():
        from tests.model_export import build_model_repository

        build_model_repository(repo)
    return repo


def run_case(input_file: Path, backend_name: str, repo: Path) -> dict[str, object]:
    """One case in this process: returns timings and memory figures."""
    import numpy as np

    from dicom_node.settings import load_settings
    from inference.pipeline import segment
    from inference.spec import load_spec
    from inference.volume_io import read_volume
    from inference.writers import write_label

    spec = load_spec(REPO / "config" / "config_inference.json")
    settings = load_settings(None).model_copy(
        update={
            "inference": load_settings(None).inference.model_copy(
                update={"model_repository": repo, "backend": backend_name}
            )
        }
    )
    # Process baseline: interpreter and libraries with their code paths loaded (a tiny volume through read,
    # resample and write), so what is measured above it is data and the model.
    import tempfile

    import SimpleITK as sitk

    from inference.transforms import resample_to_spacing

    with tempfile.TemporaryDirectory() as tiny:
        sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), str(Path(tiny) / "t.mhd"))
        tiny_image = read_volume(Path(tiny)).image
        write_label(sitk.Cast(resample_to_spacing(tiny_image, (2.0, 2.0, 2.0)) > 0, sitk.sitkUInt8), Path(tiny), "o")
    rss0 = _status_kb("VmRSS")
    from dicom_node.inference_runtime import open_backend

    with open_backend(settings, spec, backend_name) as backend:
        rx, ry, rz = spec.inferer.roi_size
        for _ in range(2):  # warm-up, twice: a runtime may size its arena on the second run of a shape
            backend.infer(np.zeros((spec.inferer.batch_size, 1, rx, ry, rz), dtype=np.float32))
        model_ws_kb = _status_kb("VmHWM") - rss0
        out_dir = OUT / f"output_{input_file.stem}"
        t0 = time.perf_counter()
        volume = read_volume(input_file.parent)
        t_read = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = segment(volume.image, spec, backend)
        t_segment = time.perf_counter() - t1
        t2 = time.perf_counter()
        write_label(result.label, out_dir, volume.name)
        t_write = time.perf_counter() - t2
        total = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    stages = {"read": t_read, **result.timings, "write": t_write}
    nx, ny, nz = result.model_grid_size
    return {
        "input": str(input_file),
        "size": list(volume.image.GetSize()),
        "model_grid": [nx, ny, nz],
        "windows": result.windows,
        "stages": stages,
        "segment_wall": t_segment,
        "total": total,
        "peak_rss_mb": peak_kb / 1024,
        "baseline_rss_mb": rss0 / 1024,
        "model_working_set_mb": model_ws_kb / 1024,
        "resampled_f32_mb": nx * ny * nz * 4 / 2**20,
    }


def _report(name: str, r: dict[str, object]) -> bool:
    stages: dict[str, float] = r["stages"]  # type: ignore[assignment]
    total = float(r["total"])  # type: ignore[arg-type]
    model = stages["model_compute"]
    ratio = (total - model) / model
    print(
        f"\n== {name}: {' x '.join(map(str, r['size']))} -> model grid "  # type: ignore[arg-type]
        f"{' x '.join(map(str, r['model_grid']))}, {r['windows']} windows"
    )  # type: ignore[arg-type]
    for stage in STAGES:
        print(f"  {stage:<14}{stages.get(stage, 0.0):9.3f} s")
    other = total - sum(stages.get(s, 0.0) for s in STAGES)
    print(f"  {'(unaccounted)':<14}{other:9.3f} s")
    print(f"  {'total':<14}{total:9.3f} s")
    print(
        f"  ratio (total - model compute) / model compute = {ratio:.3f}  (target <= 0.10: "
        f"{'met' if ratio <= 0.10 else 'NOT met'})"
    )
    peak = float(r["peak_rss_mb"])  # type: ignore[arg-type]
    base = float(r["baseline_rss_mb"])  # type: ignore[arg-type]
    ws = float(r["model_working_set_mb"])  # type: ignore[arg-type]
    vol = float(r["resampled_f32_mb"])  # type: ignore[arg-type]
    budget = 4 * vol + ws
    print(
        f"  peak RSS {peak:.0f} MB; above the {base:.0f} MB process baseline: {peak - base:.0f} MB; budget "
        f"4 x {vol:.0f} MB (float32 resampled) + {ws:.0f} MB (model working set) = {budget:.0f} MB: "
        f"{'met' if peak - base <= budget else 'NOT met'}"
    )
    return ratio <= 0.10 and peak - base <= budget


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("onnxruntime", "triton"), default="onnxruntime")
    parser.add_argument("--cases", default="lung1,big")
    parser.add_argument("--model", type=Path, default=None, help="an ONNX file to benchmark instead")
    parser.add_argument("--child", nargs=2, metavar=("INPUT", "REPO"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_case(Path(args.child[0]), args.backend, Path(args.child[1]))))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = _prepare_inputs()
    repo = _model_repository(args.model)
    print(f"backend {args.backend}, model {repo}, {os.cpu_count()} CPUs")
    ok = True
    for name in args.cases.split(","):
        # A fresh process per case: peak RSS is per process.
        proc = subprocess.run(
            [sys.executable, __file__, "--backend", args.backend, "--child", str(inputs[name]), str(repo)],
            capture_output=True,
            text=True,
            check=False,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        result = json.loads(line[len("RESULT ") :])
        ok = _report(name, result) and ok
        if args.json:
            print(json.dumps(result))
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
