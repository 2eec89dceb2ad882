"""Benchmark of the file-mode inference path: where the time and the memory go, per stage.

For lung1 (512 x 512 x 48) and for a 512 x 512 x 300 volume made from it (lung1 and its z-flip stacked, lung1's
spacing kept), each in a fresh process: read, resample, normalise, tiling, model compute, blending, labels,
restore, write; peak RSS; and the ratio (total - model compute) / model compute (target <= 0.10), and peak
memory against 4 x the float32 resampled volume plus the model's own working set.

    python bench/infer.py [--backend onnxruntime|triton] [--cases lung1,big] [--model PATH.onnx]
    python bench/infer.py --chests [--backend ...]     # windows only where the lungs are, on the seven real CTs
    python bench/infer.py --shifts                     # why those are the whole grid's own windows
    python bench/infer.py --shares                     # which windows a provably unchanged result needs

Each case runs twice, with the bundled ``inferer.windows: lung_fields`` (windows over the lung fields only) and with
``all`` (today's whole grid), and prints windows total / run and model compute for both (issue 20). ``--chests``
runs the seven real chest CTs of ../shared/data both ways, clean and with ground glass inserted by the training
simulator, and the real COVID-19 CT (MIDRC-RICORD-1A, evaluation only) as it is, and prints the windows, the
model compute and the agreement (Dice) of the two. ``--shifts`` moves one window of a real chest by a few voxels and
compares its predictions on the lung voxels both windows hold well inside them: the reason the skip runs only
the whole grid's own windows.

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
    """The repository the benchmark serves: copied afresh from models/ at every run (a copy kept from an earlier
    run goes stale when the committed model changes), with ``model`` in place of the committed ONNX file."""
    from tests.model_export import build_model_repository

    repo = build_model_repository(OUT / "model_repository")
    if model is not None:
        (repo / "segmentation_ct_covid_lesion_v1" / "1" / "model.onnx").write_bytes(model.read_bytes())
    return repo


def _spec_with_windows(mode: str):  # type: ignore[no-untyped-def]
    import dataclasses

    from inference.spec import load_spec

    spec = load_spec(REPO / "config" / "config_inference.json")
    return dataclasses.replace(spec, inferer=dataclasses.replace(spec.inferer, windows=mode))


def run_case(input_file: Path, backend_name: str, repo: Path, windows: str = "lung_fields") -> dict[str, object]:
    """One case in this process: returns timings and memory figures."""
    import numpy as np

    from dicom_node.settings import load_settings
    from inference.pipeline import segment
    from inference.spec import load_spec
    from inference.volume_io import read_volume
    from inference.writers import write_label

    spec = _spec_with_windows(windows)
    assert load_spec  # the bundled spec, with inferer.windows set for this run
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
        "windows_run": result.windows_run,
        "windows_mode": windows,
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
        f"{' x '.join(map(str, r['model_grid']))}, windows {r['windows_mode']}: {r['windows_run']} run of "
        f"{r['windows']} on the whole grid"
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
    parser.add_argument("--child", nargs=3, metavar=("INPUT", "REPO", "WINDOWS"), help=argparse.SUPPRESS)
    parser.add_argument("--chests", action="store_true", help="windows and agreement on the seven real chest CTs")
    parser.add_argument("--shifts", action="store_true", help="one window moved by a few voxels: what changes")
    parser.add_argument("--shares", action="store_true", help="the windows each chest's lung fields need, no model")
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = parser.parse_args()
    if args.child:
        result = run_case(Path(args.child[0]), args.backend, Path(args.child[1]), args.child[2])
        print("RESULT " + json.dumps(result))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    repo = _model_repository(args.model)
    print(f"backend {args.backend}, model {repo}, {os.cpu_count()} CPUs")
    if args.chests:
        return chests(args.backend, repo)
    if args.shifts:
        return shifts(repo)
    if args.shares:
        return shares()
    inputs = _prepare_inputs()
    ok = True
    for name in args.cases.split(","):
        runs = {}
        for windows in ("lung_fields", "all"):
            # A fresh process per case: peak RSS is per process.
            proc = subprocess.run(
                [sys.executable, __file__, "--backend", args.backend, "--child", str(inputs[name]), str(repo), windows],
                capture_output=True,
                text=True,
                check=False,
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                return 1
            runs[windows] = json.loads(line[len("RESULT ") :])
            ok = _report(f"{name} (windows {windows})", runs[windows]) and ok
            if args.json:
                print(json.dumps(runs[windows]))
        skip, full = runs["lung_fields"], runs["all"]
        print(
            f"  {name}: windows {skip['windows_run']} / {full['windows_run']} run, model compute "
            f"{skip['stages']['model_compute']:.1f} s / {full['stages']['model_compute']:.1f} s "
            f"(lung fields only / whole grid)"
        )
    return 0 if ok else 3


CHESTS = (
    "chest_ct_volumes/lung1_image.nrrd",
    "chest_ct_volumes/lung2_image.nrrd",
    "chest_ct_lidc/lidc_idri_0028.nrrd",
    "chest_ct_lidc/lidc_idri_0295.nrrd",
    "chest_ct_lidc/lidc_idri_0306.nrrd",
    "chest_ct_lidc/lidc_idri_0350.nrrd",
    "ct_lidc_0001_jpegls/ct",
)
COVID = "covid_ct_ricord/covid_ricord_1.nrrd"
"""Real COVID-19 ground glass (CC BY-NC 4.0: evaluation and reference only, never training): compared as it is."""


def _read_chest(rel: str):  # type: ignore[no-untyped-def]
    """One real CT of ../shared/data in float32 HU: a volume file, or a DICOM series folder."""
    import SimpleITK as sitk

    path = REPO.parent / "shared" / "data" / rel
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


def _lung_fields(grid, spec):  # type: ignore[no-untyped-def]
    """The pipeline's lung fields on a model grid: (fields in blocks, block size, a voxel mask (z, y, x))."""
    from inference.lung_fields import expand_blocks, lung_field_blocks

    fields, block = lung_field_blocks(grid, spec.post.lung_fields)
    return fields, block, expand_blocks(fields, block, tuple(reversed(grid.GetSize())))


def chests(backend_name: str, repo: Path) -> int:
    """Windows over the lung fields against the whole grid on every real chest CT: counts, model compute and the
    agreement of the labels (Dice), on the scan as it is and with ground glass inserted (seed 2020, which training
    never drew), whose lesions give the comparison something to agree on; and on the real COVID-19 CT as it is."""
    import numpy as np
    import SimpleITK as sitk

    from dicom_node.inference_runtime import open_backend
    from dicom_node.settings import load_settings
    from inference.pipeline import segment

    sys.path.insert(0, str(REPO / "models" / "training"))
    import simulate

    settings = load_settings(None)
    settings = settings.model_copy(
        update={"inference": settings.inference.model_copy(update={"model_repository": repo})}
    )
    full_spec, skip_spec = _spec_with_windows("all"), _spec_with_windows("lung_fields")
    totals = {"all": 0, "lung_fields": 0}
    rows = []
    with open_backend(settings, skip_spec, backend_name) as backend:
        for rel in (*CHESTS, COVID):
            image = _read_chest(rel)
            sp = image.GetSpacing()
            variants = [("clean", image)]
            if rel != COVID:
                hu = sitk.GetArrayFromImage(image)
                hu2, _lab, _les = simulate.insert_ggo(
                    hu, sp, np.random.default_rng([2020, 0]), 6, lung=simulate.lung_mask(hu, sp)
                )
                with_ggo = sitk.GetImageFromArray(hu2.astype(np.float32))
                with_ggo.CopyInformation(image)
                variants.append(("ggo", with_ggo))
            row: dict[str, object] = {"volume": Path(rel).name}
            for label, img in variants:
                full = segment(img, full_spec, backend)
                skip = segment(img, skip_spec, backend)
                a, b = sitk.GetArrayViewFromImage(full.label) > 0, sitk.GetArrayViewFromImage(skip.label) > 0
                dice = 1.0 if not (a.sum() + b.sum()) else 2 * float((a & b).sum()) / float(a.sum() + b.sum())
                ml = float(np.prod(sp)) / 1000.0
                row[label] = {
                    "windows": [skip.windows_run, full.windows_run],
                    "model_s": [round(skip.timings["model_compute"], 1), round(full.timings["model_compute"], 1)],
                    "ml": [round(float(b.sum()) * ml, 2), round(float(a.sum()) * ml, 2)],
                    "dice": round(dice, 4),
                }
                if label == "clean" and rel != COVID:
                    totals["all"] += full.windows_run
                    totals["lung_fields"] += skip.windows_run
            rows.append(row)
            print(json.dumps(row), flush=True)
    columns = f"{'windows':>10}{'model s':>14}{'Dice clean':>12}{'mL clean':>14}{'Dice GGO':>10}{'mL GGO':>16}"
    print(f"\n{'volume':<22}{columns}")
    for row in rows:
        c = row["clean"]
        g = row.get("ggo")
        ggo = f"{g['dice']:>8.4f}{g['ml'][0]:>8.2f} / {g['ml'][1]:<6.2f}" if g else f"{'(real GGO)':>24}"  # type: ignore[index]
        print(
            f"{row['volume']:<22}{c['windows'][0]:>4} / {c['windows'][1]:<4}"  # type: ignore[index]
            f"{c['model_s'][0]:>6.1f} / {c['model_s'][1]:<6.1f}{c['dice']:>10.4f}"  # type: ignore[index]
            f"{c['ml'][0]:>7.2f} / {c['ml'][1]:<6.2f}{ggo}"  # type: ignore[index]
        )
    ratio = totals["all"] / max(1, totals["lung_fields"])
    print(
        f"windows over the seven: {totals['lung_fields']} run of {totals['all']} ({ratio:.2f} x fewer; target "
        f">= 1.5 x: {'met' if ratio >= 1.5 else 'NOT met'}); columns: lung fields only / whole grid"
    )
    return 0


def shifts(repo: Path) -> int:
    """One window of lidc_idri_0028 (ONNX Runtime, the bundled spec) and the same window moved by d voxels along
    x or z: the mean absolute change of the GGO logit (channel 1 minus channel 0) and the labels that flip, on
    the lung voxels both windows hold at least 40 voxels in-plane and 4 slices inside them (away from either
    window's border). The network's stride is 8: a window moved by a multiple of 8 predicts the same, one moved
    by a few voxels does not, and on a clean scan the flips are what a window laid anew would change."""
    import numpy as np
    import numpy.typing as npt
    import SimpleITK as sitk

    from inference.onnx_backend import OnnxRuntimeBackend
    from inference.transforms import normalise_intensity, resample_to_spacing

    spec = _spec_with_windows("all")
    grid = resample_to_spacing(_read_chest(CHESTS[2]), spec.pre.spacing_mm, spec.pre.interpolation)
    volume = np.clip(sitk.GetArrayFromImage(grid), spec.pre.intensity.a_min, spec.pre.intensity.a_max)
    volume = normalise_intensity(volume.astype(np.float32), spec.pre.intensity)
    _fields, _block, lungs = _lung_fields(grid, spec)
    rz, ry, rx = reversed(spec.inferer.roi_size)
    backend = OnnxRuntimeBackend(spec, spec.model.onnx_path(repo), 2)

    def logits(z: int, y: int, x: int) -> npt.NDArray[np.float32]:
        window = volume[z : z + rz, y : y + ry, x : x + rx]
        out = backend.infer(np.ascontiguousarray(window.transpose(2, 1, 0))[None, None])[0]
        return (out[1] - out[0]).transpose(2, 1, 0)  # type: ignore[no-any-return]

    base = (16, 88, 88)
    reference = logits(*base)
    print(f"{'moved':<10}{'mean |change|':>15}{'p99':>8}{'flips / positives':>20}")
    for axis, name in ((2, "x"), (0, "z")):
        for d in (1, 2, 4, 8, 16):
            moved = list(base)
            moved[axis] += d
            if moved[0] + rz > volume.shape[0] or d > (4 if axis == 0 else 40) * 2:
                continue
            other = logits(*moved)
            margin = [4, 40, 40]
            lo = [b + m + (d if a == axis else 0) for a, (b, m) in enumerate(zip(base, margin, strict=True))]
            hi = [b + r - m for b, r, m in zip(base, (rz, ry, rx), margin, strict=True)]
            region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            ref = reference[tuple(slice(a - b0, z - b0) for a, z, b0 in zip(lo, hi, base, strict=True))]
            mov = other[tuple(slice(a - b0, z - b0) for a, z, b0 in zip(lo, hi, moved, strict=True))]
            inside = lungs[region]
            change = np.abs(ref - mov)[inside]
            flips = int(((ref > 0) != (mov > 0))[inside].sum())
            positives = int(((ref > 0) | (mov > 0))[inside].sum())
            print(f"{name} + {d:<6}{change.mean():>15.4f}{np.percentile(change, 99):>8.3f}{flips:>11} / {positives:<8}")
    backend.close()
    return 0


def shares() -> int:
    """On each real chest CT, without the model: the whole grid's windows, those a lung-field voxel lies under,
    those holding at least 1 % of the blend's weight at some lung-field voxel, and those the skip runs. Labels are
    provably those of the whole grid only when every window of the second kind runs; any window skipped beyond
    that changes the blended logit somewhere in the lungs, and a label flips where the logit was that close to 0."""
    import numpy as np

    from inference.pipeline import lattice_filter, lattice_windows, lung_bounds
    from inference.sliding_window import importance_map
    from inference.transforms import resample_to_spacing

    spec = _spec_with_windows("lung_fields")
    roi = tuple(reversed(spec.inferer.roi_size))
    weights = importance_map(roi, spec.inferer.mode, spec.inferer.sigma_scale)
    totals = np.zeros(4, dtype=int)
    print(f"{'volume':<22}{'grid':>6}{'under lungs':>13}{'share >= 1 %':>14}{'skip runs':>11}")
    for rel in CHESTS:
        grid = resample_to_spacing(_read_chest(rel), spec.pre.spacing_mm, spec.pre.interpolation)
        shape = tuple(reversed(grid.GetSize()))
        fields, block, lungs = _lung_fields(grid, spec)
        windows = lattice_windows(shape, roi, spec.inferer.overlap)
        local = [tuple(slice(0, s.stop - s.start) for s in w) for w in windows]
        blend = np.zeros(shape, dtype=np.float32)
        for w, own in zip(windows, local, strict=True):
            blend[w] += weights[own]
        under = weighty = 0
        for w, own in zip(windows, local, strict=True):
            inside = lungs[w]
            if inside.any():
                under += 1
                weighty += bool((weights[own][inside] / blend[w][inside]).max() >= 0.01)
        bounds = lung_bounds(fields, block, shape)
        assert bounds is not None
        keep = lattice_filter(fields, block, bounds, shape, roi, spec.inferer.overlap)
        run = sum(keep(w) for w in windows)
        row = np.array([len(windows), under, weighty, run])
        totals += row
        print(f"{Path(rel).name:<22}{row[0]:>6}{row[1]:>13}{row[2]:>14}{row[3]:>11}")
    print(f"{'all seven':<22}{totals[0]:>6}{totals[1]:>13}{totals[2]:>14}{totals[3]:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
