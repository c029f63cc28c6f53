"""The subcommands of ``autoalign``: one function per command, ``args`` in, exit status out.

:data:`COMMANDS` maps each subcommand's name to its function; :func:`autoalign.cli.main`
dispatches through it. Every function raises :class:`~autoalign.cli.parser.CLIError`
(or ``ValueError``, ``FileNotFoundError``, :class:`~autoalign.AutoalignError`) for a
user mistake, which ``main`` reports as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import pathlib
import sys
import time
from typing import Callable

from .data import make_data
from .models import inspect_target, load_checkpoint, load_into, load_model_target
from .parser import PROG, CLIError, parse_floats, parse_option, parse_shape

__all__ = ["COMMANDS", "cmd_inspect", "cmd_aligners", "cmd_merge", "cmd_demo"]


def cmd_inspect(args: argparse.Namespace) -> int:
    """``autoalign inspect MODEL``: discover the merge points, print them and self-check them.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``inspect`` (see :func:`~autoalign.cli.parser.build_parser`).

    Returns
    -------
    int
        0, or 1 when the self-check fails.
    """
    from .. import check, find_merge_points
    from ..spec import KINDS

    shape = parse_shape(args.input_shape) if args.input_shape else None
    model, x = inspect_target(args.model, shape, args.seed)
    t0 = time.perf_counter()
    spec = find_merge_points(model, x, tracer=args.tracer, leaf_modules=tuple(args.leaf_module), strict=args.strict)
    t_discover = time.perf_counter() - t0
    print(spec.table())
    print()
    total = sum(p.dim for p in spec.points if not p.io)
    active = sum(p.dim for p in spec.points if p.kind != "frozen")
    counts = spec.kind_counts()
    print(f"model: {type(model).__name__}, input {tuple(x.shape)}; {len(spec.points)} merge points, "
          f"{len(spec.folds)} BatchNorm(s) folded, {len(spec.unused)} unused tensors; discovered in {t_discover:.2f} s")
    print(f"coverage: {spec.coverage():.3f} ({active} of {total} hidden feature dims can be aligned)")
    print("kinds: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in reversed(KINDS)))
    status = 0
    if args.no_check:
        print("self-check: skipped (--no-check)")
    else:
        t0 = time.perf_counter()
        report = check(model, x, spec=spec, seed=args.seed)
        print(f"{report} [{time.perf_counter() - t0:.2f} s]")
        if not report.ok:
            print(f"{PROG}: the self-check FAILED: the discovered spec does not preserve the model's function", file=sys.stderr)
            status = 1
    if args.json:
        out = pathlib.Path(args.json)
        if out.parent and not out.parent.exists():
            raise FileNotFoundError(f"cannot write {args.json!r}: folder {str(out.parent)!r} does not exist")
        out.write_text(spec.to_json(indent=1))
        print(f"spec written to {args.json}")
    return status


def cmd_aligners(args: argparse.Namespace) -> int:
    """``autoalign aligners``: one line per registered aligner.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options (none).

    Returns
    -------
    int
        0.
    """
    from ..aligners import describe_aligners

    desc = describe_aligners()
    width = max((len(n) for n in desc), default=0)
    for name, text in desc.items():
        print(f"{name.ljust(width)}  {text}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``autoalign merge``: merge checkpoints of one architecture and write the merged one.

    Cheap checks (aligner and options, files, output folder, reference) come
    before anything is loaded.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``merge`` (see :func:`~autoalign.cli.parser.build_parser`).

    Returns
    -------
    int
        0.
    """
    import torch

    from .. import __version__, get_aligner, list_aligners
    from ..merge import run
    from ..options import MergeOptions
    from ..progress import LineProgress, Progress
    from ..report import Timings

    # cheap checks first: aligner name and options, files, output folder
    options = dict(parse_option(o) for o in args.option)
    names = list_aligners() + ["auto"]
    if args.aligner not in names:
        close = difflib.get_close_matches(args.aligner, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CLIError(f"unknown aligner {args.aligner!r}; choose one of {', '.join(names)}.{hint}")
    if args.aligner != "auto":
        try:  # ridge=auto is chosen at merge time; check the rest now
            get_aligner(args.aligner, **{k: v for k, v in options.items() if not (k == "ridge" and v == "auto")})
        except TypeError as exc:
            raise CLIError(f"{exc} (from --option)") from None
    if len(args.checkpoint) < 2:
        raise CLIError("merge needs at least two --checkpoint files")
    for path in args.checkpoint:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    out = pathlib.Path(args.out)
    if str(out.parent) and not out.parent.exists():
        raise FileNotFoundError(f"cannot write {args.out!r}: folder {str(out.parent)!r} does not exist")
    if args.reference == "best":
        reference: int | str = "best"
    else:
        try:
            reference = int(args.reference)
        except ValueError:
            raise CLIError(f'--reference must be a checkpoint index or "best", got {args.reference!r}') from None
        if not 0 <= reference < len(args.checkpoint):
            raise CLIError(f"--reference {reference} is out of range for {len(args.checkpoint)} checkpoints")
    if args.num_batches is not None and args.num_batches < 1:
        raise CLIError(f"--num-batches must be >= 1, got {args.num_batches}")
    mean = parse_floats(args.mean, "--mean") if args.mean else None
    std = parse_floats(args.std, "--std") if args.std else None
    if (mean is None) != (std is None):
        raise CLIError("--mean and --std go together")
    # one display for the whole command (loading, then every stage of the merge) on stderr
    progress = LineProgress() if args.progress else Progress()
    # the same options object the library checks, checked before anything is loaded
    opts = MergeOptions.from_kwargs(
        **options, aligner=args.aligner, reference=reference,
        repair=None if args.repair == "none" else args.repair, batchnorm=args.batchnorm, features=args.features,
        scheme=args.scheme, num_batches=args.num_batches, device=args.device, progress=progress, tracer=args.tracer,
        precision=args.precision,
    )
    opts.check(len(args.checkpoint))

    load = Timings(progress=progress)
    with progress.session():
        with load.stage("load"):
            loaded = [load_checkpoint(p, trust=args.trust_checkpoints) for p in args.checkpoint]
            arch = args.arch
            if arch is None:
                archs = {meta.get("arch") for _, meta in loaded}
                if len(archs) == 1 and isinstance(next(iter(archs)), str):
                    arch = next(iter(archs))
                    progress.clear()
                    print(f"architecture from the checkpoints: {arch}", flush=True)
                else:
                    raise CLIError("--arch is required (the checkpoints do not record one architecture)")
            models = []
            for path, (sd, _) in zip(args.checkpoint, loaded):
                model = load_model_target(arch, num_classes=args.num_classes)
                load_into(model, sd, path)
                model.eval()
                models.append(model)
            data = make_data(args.data, batch_size=args.batch_size, split=args.split, image_size=args.image_size, mean=mean, std=std)

        progress.clear()
        print(f"merging {len(models)} x {arch} with aligner {args.aligner!r} on {args.data} ...", flush=True)
        result = run(models, data, opts)
        report = result.report
        timings = {**load, **report.timings}
        progress.summary(timings)
    table = report.table()
    print(table)
    print()
    print(f"aligner: {report.aligner}; reference: checkpoint {report.reference} ({args.checkpoint[report.reference]}); "
          f"repair: {report.repair or 'none'}; BatchNorms folded: {report.folded_batchnorms}")
    if report.selection is not None:
        print(report.selection.table())
    if report.scheme == "iterative":
        print(f"scheme: iterative, {report.iterations} rounds, last relative plan change {report.plan_change:.2e}")
    projected = sum(1 for p in report.points if p.projected)
    if projected:
        print(f"{projected} merge points projected onto a restricted kind (see 'projected')")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()) + f"; total {sum(timings.values()):.2f} s")
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "arch": arch,
            "num_classes": args.num_classes,
            "aligner": args.aligner,
            "aligner_options": options,
            "chosen": None if report.selection is None else report.selection.chosen,
            "reference": report.reference,
            "repair": report.repair,
            "scheme": report.scheme,
            "checkpoints": [str(p) for p in args.checkpoint],
            "data": args.data,
            "report": table,
            "timings": timings,
            "autoalign_version": __version__,
        },
        out,
    )
    print(f"merged model written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``autoalign demo``: train small models from different seeds and merge them with every aligner.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``demo`` (see :func:`~autoalign.cli.parser.build_parser`).

    Returns
    -------
    int
        0.
    """
    from ..examples.demo import run_demo

    if args.models < 2:
        raise CLIError(f"--models must be >= 2, got {args.models}")
    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(
        args.dataset, data_root=args.data_root, n_models=args.models, epochs=args.epochs, seed=args.seed,
        out_dir=args.out, progress=not args.quiet, device=args.device,
    )
    return 0


#: The function of each subcommand, by name.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": cmd_inspect,
    "aligners": cmd_aligners,
    "merge": cmd_merge,
    "demo": cmd_demo,
}
