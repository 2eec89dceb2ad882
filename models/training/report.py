"""Markdown tables of a pattern evaluation (``evaluate_patterns.py``'s JSON), beside another model's on the same
cases: what the model card and the closing notes quote, printed from the measured files so they cannot drift.

    .venv/bin/python models/training/report.py NEW.json [--before OLD.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cell(entry: dict, before: dict | None, suffix: str = "") -> str:  # type: ignore[type-arg]
    mean, p5 = "dice_mean" + suffix, "dice_p5" + suffix
    now = f"{entry[mean]:.3f} / {entry[p5]:.3f}"
    if before is None or mean not in before:
        return now
    return f"{now} ({before[mean]:.3f} / {before[p5]:.3f})"


def tables(new: dict, old: dict | None = None) -> str:  # type: ignore[type-arg]
    lines = []
    backgrounds = new["heldout_backgrounds"]
    head = (
        "| pattern | "
        + " | ".join(backgrounds)
        + " | both: regions, Dice mean / p5 | both, per lung: lungs, Dice mean / p5 | volume error (max) |"
    )
    lines += [head, "|" + "---|" * (len(backgrounds) + 4)]
    for pattern, entry in new["by_pattern"].items():
        per = new["by_pattern_and_background"][pattern]
        old_per = old["by_pattern_and_background"][pattern] if old else None
        cells = [f"{_cell(per[b], old_per[b] if old_per else None)} ({per[b]['regions_ge_10mm']})" for b in backgrounds]
        old_entry = old["by_pattern"][pattern] if old else None
        both = _cell(entry, old_entry)
        lungs = _cell(entry, old_entry, "_per_lung")
        if entry.get("criterion") == "lungs":  # the figure the pattern's target is read from
            lungs = f"**{lungs}**"
        else:
            both = f"**{both}**"
        err = entry["max_abs_volume_error"]
        old_err = old["by_pattern"][pattern]["max_abs_volume_error"] if old else None
        err_s = "" if err is None else f"{100 * err:.1f} %" + ("" if old_err is None else f" ({100 * old_err:.1f} %)")
        lines.append(
            f"| {pattern} | "
            + " | ".join(cells)
            + f" | {entry['regions_ge_10mm']}: {both} | {entry['lungs']}: {lungs} | {err_s} |"
        )
    lines += [
        "",
        "| background | held out | FP (mL) | solid nodules | most of one nodule marked |",
        "|---|---|---|---|---|",
    ]
    for name, c in new["clean_volumes"].items():
        o = old["clean_volumes"].get(name) if old else None
        fp = f"{c['fp_volume_ml']:.2f}" + (f" ({o['fp_volume_ml']:.2f})" if o else "")
        frac = f"{100 * c['solid_max_fraction_marked']:.1f} %" + (
            f" ({100 * o['solid_max_fraction_marked']:.1f} %)" if o else ""
        )
        lines.append(f"| {name} | {'yes' if c['heldout'] else 'no'} | {fp} | {c['solid_nodules']} | {frac} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("new", type=Path)
    ap.add_argument("--before", type=Path, default=None)
    args = ap.parse_args()
    new = json.loads(args.new.read_text())
    old = json.loads(args.before.read_text()) if args.before else None
    print(tables(new.get("metrics", new), old.get("metrics", old) if old else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
