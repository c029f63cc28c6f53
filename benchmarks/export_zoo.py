"""The torch.export front end on torchvision's classifiers, side by side with torch.fx.

Usage::

    python benchmarks/export_zoo.py [--models resnet18,vit_b_32] [--resume]

For every classifier (randomly initialised, the small inputs of
``autoalign.examples.zoo.torchvision_example``): discover the merge points through
``tracer="fx"`` and ``tracer="export"``, compare the two specs (points: name, dim,
kind; every parameter axis: role, block, point and coordinate of each position;
folded BatchNorms), and self-check the exported spec (``autoalign.check`` with
``spec=``; float64 re-check for the models whose float32 rounding the torchvision
sweep already documents). One model per subprocess with a time limit, so a hang
costs one row. Rows go to ``benchmarks/results/export/export_zoo_results.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results" / "export" / "export_zoo_results.json"
FLOAT32_CHAOTIC = {
    "efficientnet_v2_l", "resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2",
}


def point_signatures(spec) -> list[str]:
    """Each point as what it owns (kind, dim, and every parameter position it holds, with its
    coordinate), without its name or index: two specs that differ only in the points' names
    and order give the same sorted signatures."""
    owned: dict[int, list] = {i: [] for i in range(len(spec.points))}
    for a in spec.axes:
        for pos, (p, c) in enumerate(zip(a.point_of.tolist(), a.local_of.tolist())):
            if p >= 0:
                owned[p].append((a.tensor, a.axis, a.role, str(a.block), pos, c))
    return sorted(f"{p.kind}/{p.dim}/{sorted(owned[i])}" for i, p in enumerate(spec.points))


def spec_key(spec, *, named: bool = True) -> dict:
    """What must agree between the front ends, as comparable plain data (``named=False``:
    points by what they own, so that specs that differ only in names and order agree)."""
    if not named:
        return {"points": point_signatures(spec), "folds": len(spec.folds)}
    names = [p.name for p in spec.points]
    axes = sorted(
        (a.tensor, a.axis, a.role, str(a.block), tuple(names[p] if p >= 0 else "-" for p in a.point_of.tolist()),
         tuple(a.local_of.tolist()))
        for a in spec.axes
    )
    return {"points": [(n, p.dim, p.kind) for n, p in zip(names, spec.points)], "axes": axes,
            "folds": sorted(map(str, spec.folds))}


def one(name: str) -> dict:
    """Both front ends on one model (run in a subprocess)."""
    import torch

    import autoalign
    from autoalign.examples.zoo import torchvision_example

    torch.set_num_threads(1)
    model, x = torchvision_example(name)
    row: dict = {"model": name}
    t = time.perf_counter()
    fx_spec = autoalign.find_merge_points(model, x, tracer="fx")
    row["fx_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    try:
        ex_spec = autoalign.find_merge_points(model, x, tracer="export")
    except autoalign.TraceError as exc:
        row.update(exported=False, error=str(exc).splitlines()[0][:300])
        return row
    row["export_seconds"] = round(time.perf_counter() - t, 2)
    a, b = spec_key(fx_spec), spec_key(ex_spec)
    row.update(exported=True, same_points=a["points"] == b["points"], same_axes=a["axes"] == b["axes"],
               same_folds=a["folds"] == b["folds"],
               same_up_to_names=spec_key(fx_spec, named=False) == spec_key(ex_spec, named=False), coverage_fx=round(fx_spec.coverage(), 4),
               coverage_export=round(ex_spec.coverage(), 4))
    report = autoalign.check(model, x, spec=ex_spec)
    row["check_export"] = bool(report.ok)
    if not report.ok and name in FLOAT32_CHAOTIC:
        report = autoalign.check(model.double(), x.double(), spec=ex_spec)
        row["check_export_float64"] = bool(report.ok)
    row["max_abs_diff"] = float(report.max_abs_diff)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: all classifiers)")
    parser.add_argument("--resume", action="store_true", help="keep rows already in the results file")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    from autoalign.examples.zoo import torchvision_classifiers

    import torch

    names = args.models.split(",") if args.models else torchvision_classifiers()
    data = json.loads(RESULTS.read_text()) if args.resume and RESULTS.exists() else {"rows": []}
    done = {r["model"] for r in data["rows"]}
    data.update(command=" ".join(["python", "benchmarks/export_zoo.py", *sys.argv[1:]]), machine=platform.processor()
                or platform.machine(), threads=1, torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    for name in names:
        if name in done:
            continue
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                  timeout=args.timeout, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"model": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"timeout after {args.timeout:.0f} s"}
        row["seconds"] = round(time.perf_counter() - t, 1)
        data["rows"].append(row)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(json.dumps(row), flush=True)
    rows = data["rows"]
    exported = [r for r in rows if r.get("exported")]
    same = [r for r in exported if r["same_points"] and r["same_axes"] and r["same_folds"]]
    renamed = [r for r in exported if r not in same and r.get("same_up_to_names")]
    ok = [r for r in exported if r.get("check_export") or r.get("check_export_float64")]
    print(f"{len(rows)} models: {len(exported)} exported, {len(same)} with the fx spec, {len(renamed)} with it up to "
          f"the points' names, {len(ok)} pass the self-check")


if __name__ == "__main__":
    main()
