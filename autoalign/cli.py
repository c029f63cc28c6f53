"""The ``autoalign`` command line.

Subcommands
-----------
``inspect``   discover a model's merge points, print the spec and self-check it.
``aligners``  list the registered aligners.
``merge``     merge checkpoints of one architecture into one.
``demo``      train small models from different seeds and merge them with every aligner.

Run ``autoalign COMMAND --help`` (or ``python -m autoalign COMMAND --help``) for
the options of each. Mistakes in the arguments or inputs are reported as one line
``autoalign: error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import pathlib
import pickle
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "parse_option", "parse_shape", "load_model_target", "load_checkpoint", "make_data"]

PROG = "autoalign"


class CLIError(Exception):
    """A user mistake detected by the command line (reported without a traceback)."""


# ----------------------------------------------------------------------------- small parsers


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,3,64,64"`` (or ``"2x3x64x64"``) → ``(2, 3, 64, 64)``."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise CLIError(f"--input-shape must be comma-separated integers like 2,3,64,64, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise CLIError(f"--input-shape must be positive integers like 2,3,64,64, got {text!r}")
    return shape


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def parse_option(text: str) -> tuple[str, Any]:
    """``"ridge=0.1"`` → ``("ridge", 0.1)``; numbers, booleans, ``none`` and JSON lists are parsed."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise CLIError(f"--option must look like key=value (e.g. ridge=0.1), got {text!r}")
    return key, _parse_value(value)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise CLIError(f"{what} must be comma-separated numbers, got {text!r}") from None


# ----------------------------------------------------------------------------- models


def _torchvision_names() -> list[str]:
    from .examples.zoo import torchvision_classifiers

    return torchvision_classifiers()


def _unknown_model_message(name: str) -> str:
    names = _torchvision_names()
    close = difflib.get_close_matches(name, names, n=3)
    if close:
        hint = f"did you mean {close[0]}?" if len(close) == 1 else f"did you mean {', '.join(close[:-1])} or {close[-1]}?"
    else:
        from .examples.zoo import model_family

        examples: dict[str, str] = {}
        for n in sorted(names):
            fam = model_family(n)
            if fam not in examples or (len(n), n) < (len(examples[fam]), examples[fam]):
                examples[fam] = n
        hint = f"no close name; torchvision classifiers include {', '.join(sorted(examples.values()))}."
    return (
        f"{name!r} is not a torchvision classifier: {hint} "
        "For your own model pass module:callable, e.g. mypackage.models:make_net"
    )


def _import_callable(target: str) -> Callable[..., Any]:
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise CLIError(f"expected module:callable (e.g. mypackage.models:make_net), got {target!r}")
    # like `python -m`, let modules in the working directory be found by the console script
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise CLIError(f"cannot import module {mod_name!r} (from {target!r}): {exc}; is it on PYTHONPATH?") from None
        raise CLIError(f"importing {mod_name!r} failed: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CLIError(f"module {mod_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{target!r} is a {type(obj).__name__}, not a callable that returns an nn.Module")
    return obj


def _call_factory(target: str, **kwargs: Any) -> Any:
    from torch import nn

    factory = _import_callable(target)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        if kwargs:
            raise CLIError(f"{target}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {exc}") from None
        raise
    if not isinstance(model, nn.Module):
        raise CLIError(f"{target}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _torchvision_name(target: str) -> str | None:
    """The torchvision model name a target refers to, or None for module:callable."""
    if target.startswith("torchvision:"):
        return target.split(":", 1)[1]
    if ":" not in target:
        return target
    return None


def load_model_target(target: str, *, num_classes: int | None = None) -> Any:
    """Build an untrained model from ``torchvision:NAME``, ``NAME`` or ``module:callable``.

    torchvision models are built with ``weights=None`` (nothing is downloaded) and
    ``num_classes`` when given; ``module:callable`` is called with no arguments
    (or ``num_classes=`` when given).
    """
    name = _torchvision_name(target)
    if name is None:
        kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        return _call_factory(target, **kwargs)
    if name not in _torchvision_names():
        raise CLIError(_unknown_model_message(name))
    import torchvision

    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    if name in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = True
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _inspect_target(target: str, input_shape: tuple[int, ...] | None, seed: int) -> tuple[Any, Any]:
    import torch

    name = _torchvision_name(target)
    if name is None:
        if input_shape is None:
            raise CLIError(f"--input-shape is required for {target!r} (e.g. --input-shape 2,3,32,32)")
        model = _call_factory(target)
        model.eval()
        return model, torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
    if name not in _torchvision_names():
        raise CLIError(_unknown_model_message(name))
    from .examples.zoo import torchvision_example

    model, x = torchvision_example(name, seed=seed)
    if input_shape is not None:
        x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
    return model, x


# ----------------------------------------------------------------------------- checkpoints


def _extract_state_dict(obj: Any, path: str) -> dict[str, Any]:
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CLIError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            return inner.state_dict()
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    keys = ", ".join(map(repr, list(obj)[:8]))
    raise CLIError(f"checkpoint {path!r} is neither a state dict nor a dict with a 'state_dict' entry (keys: {keys})")


def load_checkpoint(path: str, *, trust: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: ``(state_dict, metadata)``.

    Accepts a state dict or a dict with a ``state_dict`` (or ``model_state_dict``)
    entry, as ``benchmarks/train.py`` and ``autoalign merge`` write. Loaded with
    ``weights_only=True`` unless ``trust`` is set.
    """
    import torch

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path!r} does not exist" if not p.exists() else f"checkpoint {path!r} is not a file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if trust:
            raise CLIError(f"cannot read checkpoint {path!r}: {exc}") from None
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        detail = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.strip().startswith("WeightsUnpickler error:")), "")
        detail = detail.split(" was not an allowed global")[0]
        raise CLIError(
            f"checkpoint {path!r} holds objects other than tensors and plain data"
            + (f" ({detail.rstrip('.')})" if detail else "")
            + "; if you trust the file, pass --trust-checkpoints to load it with full pickle"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CLIError(f"cannot read checkpoint {path!r}: {exc}") from None
    sd = _extract_state_dict(obj, path)
    meta = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))} if isinstance(obj, Mapping) else {}
    return sd, meta


def _load_into(model: Any, sd: dict[str, Any], path: str) -> None:
    keys = set(model.state_dict())
    if not (keys & set(sd)) and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}  # saved from DataParallel/DDP
    missing = sorted(keys - set(sd))
    unexpected = sorted(set(sd) - keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise CLIError(f"checkpoint {path!r} does not fit the architecture: {'; '.join(parts)}; check --arch / --num-classes")
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = lines[0] if lines else str(exc).splitlines()[0]
        raise CLIError(f"checkpoint {path!r} does not fit the architecture: {detail}; check --arch / --num-classes") from None


# ----------------------------------------------------------------------------- data

DATA_HELP = (
    "calibration data: digits | mnist[:ROOT] | fashion-mnist[:ROOT] | cifar10[:ROOT] (ROOT defaults to "
    "$AUTOALIGN_DATA) | imagefolder:PATH | tensor:FILE.pt (a saved tensor of inputs, or an (inputs, targets) pair)"
)


def _batches(x: Any, y: Any, batch_size: int) -> list[Any]:
    n = int(x.shape[0])
    if y is None:
        return [x[i : i + batch_size] for i in range(0, n, batch_size)]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def make_data(
    spec: str,
    *,
    batch_size: int = 64,
    split: str = "train",
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Any:
    """A re-iterable of calibration batches from a ``--data`` value (see ``DATA_HELP``)."""
    import torch

    from .examples import datasets

    if batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {batch_size}")
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("digits", "mnist", "fashion-mnist", "fashion_mnist", "cifar10", "cifar-10"):
        try:
            x, y = datasets.load_dataset(kind, data_root=arg or None, split=split)  # type: ignore[arg-type]
        except FileNotFoundError:
            if arg:
                raise
            raise FileNotFoundError(
                f"--data {spec}: no data root; give it as --data {kind}:ROOT or set {datasets.DATA_ENV_VAR}"
            ) from None
        x, y = datasets.random_subset(x, y)  # a fixed random order: --num-batches then sees every class
        if mean is not None and std is not None:
            x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
            return datasets.make_loader(x, y, batch_size=batch_size, shuffle=False, normalize=False)
        return datasets.make_loader(x, y, batch_size=batch_size, shuffle=False, dataset=kind)
    if kind == "tensor":
        if not arg:
            raise CLIError("--data tensor: needs a file, e.g. tensor:inputs.pt")
        if not pathlib.Path(arg).is_file():
            raise FileNotFoundError(f"data file {arg!r} does not exist")
        try:
            obj = torch.load(arg, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise CLIError(f"cannot read data file {arg!r}: {exc}") from None
        x, y = obj, None
        if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
            x, y = obj[0], (obj[1] if len(obj) > 1 else None)
        elif isinstance(obj, Mapping):
            xk = next((k for k in ("inputs", "input", "x", "images", "data") if k in obj), None)
            yk = next((k for k in ("targets", "target", "labels", "y") if k in obj), None)
            if xk is None:
                raise CLIError(f"data file {arg!r} is a dict without an 'inputs'/'x' entry (keys: {sorted(map(str, obj))})")
            x, y = obj[xk], obj.get(yk) if yk else None
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
            raise CLIError(f"data file {arg!r} must hold a non-empty tensor of inputs (first axis = samples), got {type(x).__name__}")
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]):
            y = None
        if mean is not None and std is not None and x.dim() == 4:
            x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        return _batches(x, y, batch_size)
    if kind == "imagefolder":
        if not arg:
            raise CLIError("--data imagefolder: needs a folder, e.g. imagefolder:data/train")
        if not pathlib.Path(arg).is_dir():
            raise FileNotFoundError(f"image folder {arg!r} does not exist")
        import torchvision
        from torch.utils.data import DataLoader
        from torchvision import transforms

        steps: list[Any] = []
        if image_size is not None:
            steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        steps.append(transforms.ToTensor())
        if mean is not None and std is not None:
            steps.append(transforms.Normalize(mean, std))
        try:
            ds = torchvision.datasets.ImageFolder(arg, transform=transforms.Compose(steps))
        except (FileNotFoundError, RuntimeError) as exc:
            raise CLIError(f"image folder {arg!r}: {exc}") from None
        return DataLoader(ds, batch_size=batch_size, shuffle=False)
    choices = "digits, mnist:ROOT, fashion-mnist:ROOT, cifar10:ROOT, imagefolder:PATH, tensor:FILE.pt"
    close = difflib.get_close_matches(kind, ["digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "tensor"], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise CLIError(f"unknown --data {spec!r}; use one of {choices}.{hint}")


# ----------------------------------------------------------------------------- commands


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import check, find_merge_points
    from .spec import KINDS

    shape = parse_shape(args.input_shape) if args.input_shape else None
    model, x = _inspect_target(args.model, shape, args.seed)
    t0 = time.perf_counter()
    spec = find_merge_points(model, x, leaf_modules=tuple(args.leaf_module), strict=args.strict)
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


def _cmd_aligners(args: argparse.Namespace) -> int:
    from .aligners import describe_aligners

    desc = describe_aligners()
    width = max((len(n) for n in desc), default=0)
    for name, text in desc.items():
        print(f"{name.ljust(width)}  {text}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, get_aligner, list_aligners, merge_with_report

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
    mean = _floats(args.mean, "--mean") if args.mean else None
    std = _floats(args.std, "--std") if args.std else None
    if (mean is None) != (std is None):
        raise CLIError("--mean and --std go together")

    t_start = time.perf_counter()
    loaded = [load_checkpoint(p, trust=args.trust_checkpoints) for p in args.checkpoint]
    arch = args.arch
    if arch is None:
        archs = {meta.get("arch") for _, meta in loaded}
        if len(archs) == 1 and isinstance(next(iter(archs)), str):
            arch = next(iter(archs))
            print(f"architecture from the checkpoints: {arch}")
        else:
            raise CLIError("--arch is required (the checkpoints do not record one architecture)")
    models = []
    for path, (sd, _) in zip(args.checkpoint, loaded):
        model = load_model_target(arch, num_classes=args.num_classes)
        _load_into(model, sd, path)
        model.eval()
        models.append(model)
    data = make_data(args.data, batch_size=args.batch_size, split=args.split, image_size=args.image_size, mean=mean, std=std)
    t_load = time.perf_counter() - t_start

    repair = None if args.repair == "none" else args.repair
    print(f"merging {len(models)} x {arch} with aligner {args.aligner!r} on {args.data} ...", flush=True)
    result = merge_with_report(
        models, data, aligner=args.aligner, reference=reference, repair=repair, batchnorm=args.batchnorm,
        features=args.features, scheme=args.scheme, num_batches=args.num_batches, device=args.device, progress=args.progress, precision=args.precision, **options,
    )
    report = result.report
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
    timings = {"load": t_load, **report.timings}
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from .examples.demo import run_demo

    if args.models < 2:
        raise CLIError(f"--models must be >= 2, got {args.models}")
    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(
        args.dataset, data_root=args.data_root, n_models=args.models, epochs=args.epochs, seed=args.seed,
        out_dir=args.out, progress=not args.quiet, device=args.device,
    )
    return 0


# ----------------------------------------------------------------------------- parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; shows defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == [] or default == argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``autoalign`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge neural networks trained from different seeds (CCA Merge and other aligners).",
        epilog=(
            "examples:\n"
            "  autoalign inspect resnet18\n"
            "  autoalign aligners\n"
            "  autoalign merge --arch torchvision:resnet18 --num-classes 10 --checkpoint a.pt --checkpoint b.pt \\\n"
            "      --data cifar10:~/data --aligner cca --out merged.pt\n"
            "  autoalign demo\n"
            "\nrun 'autoalign COMMAND --help' for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "inspect",
        help="discover a model's merge points and self-check them",
        description=(
            "Trace a model with torch.fx, discover its merge points and print them as a table (name, dim, kind, "
            "tensors touched, reason for a restricted kind), then coverage, counts per kind and the self-check "
            "(every non-frozen point is permuted at random; the outputs must not change). "
            "Exit status: 0 when the self-check passes, 1 when it fails, 2 for usage errors."
        ),
        epilog=(
            "examples:\n"
            "  autoalign inspect resnet18\n"
            "  autoalign inspect vit_b_16 --json vit_spec.json\n"
            "  autoalign inspect mypackage.models:make_net --input-shape 2,3,32,32 --strict"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("model", metavar="MODEL",
                   help="a torchvision classifier name (e.g. resnet18; randomly initialised, nothing is downloaded) "
                        "or module:callable returning an nn.Module (then --input-shape is required)")
    p.add_argument("--input-shape", metavar="SHAPE", default=None,
                   help="shape of the example input, e.g. 2,3,64,64 (default for torchvision models: a small image batch)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the spec as JSON to this file")
    p.add_argument("--strict", action="store_true", help="fail at the first op without a channel rule instead of freezing what it touches")
    p.add_argument("--no-check", action="store_true", help="skip the self-check")
    p.add_argument("--leaf-module", metavar="NAME", action="append", default=[],
                   help="keep this submodule (qualified name) opaque when tracing; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the example input and of the self-check permutations")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "aligners",
        help="list the registered aligners",
        description="List every registered aligner (built in and from plug-ins) with a one-line description.",
        epilog="example:\n  autoalign aligners",
        formatter_class=_Formatter,
    )
    p.set_defaults(func=_cmd_aligners)

    p = sub.add_parser(
        "merge",
        help="merge checkpoints of one architecture into one model",
        description=(
            "Load two or more checkpoints of one architecture, align them on calibration data with an aligner "
            "and average them into one model. The output file holds {'state_dict', 'arch', 'aligner', 'report', ...}; "
            "the report table and timings are printed."
        ),
        epilog=(
            "examples:\n"
            "  autoalign merge --arch torchvision:resnet18 --num-classes 10 \\\n"
            "      --checkpoint seed0.pt --checkpoint seed1.pt --data cifar10:~/data --aligner cca --out merged.pt\n"
            "  autoalign merge --arch mypackage.models:make_mlp --checkpoint a.pt --checkpoint b.pt \\\n"
            "      --data tensor:calib.pt --aligner cca --option ridge=0.1 --out merged.pt\n"
            "\ncheckpoints are state dicts or dicts with a 'state_dict' entry (as benchmarks/train.py writes)."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("--arch", metavar="ARCH", default=None,
                   help="torchvision:NAME (built with weights=None) or module:callable; "
                        "optional when every checkpoint records the same 'arch'")
    p.add_argument("--num-classes", type=int, default=None, metavar="N", help="number of classes passed to the architecture's constructor")
    p.add_argument("--checkpoint", action="append", default=[], metavar="FILE", required=True,
                   help="a checkpoint file; give at least two (repeat the option)")
    p.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    p.add_argument("--split", choices=("train", "test"), default="train", help="split of a named data set to calibrate on")
    p.add_argument("--image-size", type=int, default=None, metavar="PX", help="resize and centre-crop imagefolder images to PX x PX")
    p.add_argument("--mean", default=None, metavar="M1,M2,M3", help="normalise inputs with this per-channel mean (with --std)")
    p.add_argument("--std", default=None, metavar="S1,S2,S3", help="normalise inputs with this per-channel std (with --mean)")
    p.add_argument("--aligner", default="procrustes", metavar="NAME",
                   help="a registered aligner (see 'autoalign aligners'), or auto: the one whose merge has the lowest "
                        "held-out calibration loss (--option ridge=auto chooses a ridge the same way)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an aligner option, e.g. ridge=0.1 (numbers and true/false are parsed); repeatable")
    p.add_argument("--reference", default="0", metavar="INDEX|best",
                   help="checkpoint the others are aligned to, or 'best' (lowest loss on the calibration data)")
    p.add_argument("--num-batches", type=int, default=None, metavar="N", help="use at most N calibration batches per pass (default: all)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="calibration batch size")
    p.add_argument("--precision", choices=("float32", "float64"), default=None,
                   help="precision of the feature products behind the statistics (default: the models' own, "
                        "float32 for float32 models); float64 separates near-tied features at about 2x the cost")
    p.add_argument("--repair", choices=("auto", "reset_bn", "repair", "none"), default="auto",
                   help="after merging: auto re-estimates BatchNorm statistics when the model has BatchNorm; "
                        "repair matches every layer's per-channel mean/std to the aligned models' (REPAIR)")
    p.add_argument("--batchnorm", choices=("fold", "transform"), default="fold",
                   help="BatchNorm under a dense transform: fold (exact: folded into its producer, merged, written "
                        "back with the merged scale) or transform (the CCA Merge authors': its vectors multiplied by "
                        "the dense matrix, statistics re-estimated; needs a repair)")
    p.add_argument("--features", choices=("activation", "preactivation"), default="activation",
                   help="where features are observed: activation (what the next layers read, after the "
                        "nonlinearity) or preactivation (each producer's output after its BatchNorm)")
    p.add_argument("--scheme", choices=("all_to_one", "iterative"), default="all_to_one",
                   help="all_to_one aligns every model to the reference once; iterative re-aligns to the merged model "
                        "until the plan settles (aligners that align to a reference: cca, permutation, ot)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the merged checkpoint")
    p.add_argument("--device", default=None, metavar="DEVICE", help="compute device, e.g. cpu or cuda (default: where the models are loaded, the cpu)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--trust-checkpoints", action="store_true",
                   help="load checkpoints with full pickle (only for files you trust; default weights_only=True)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser(
        "demo",
        help="train small models from different seeds and merge them with every aligner",
        description=(
            "Train N small networks from different seeds (MLPs, with and without BatchNorm, on digits/MNIST/"
            "Fashion-MNIST; a small CNN on CIFAR-10), merge them with every registered aligner, with and without "
            "repair where it applies, and report test accuracies next to the base models and their ensemble. "
            "Writes a markdown table and a bar plot to --out."
        ),
        epilog=(
            "examples:\n"
            "  autoalign demo                       # sklearn digits, about a minute on a laptop CPU\n"
            "  autoalign demo --dataset mnist --data-root ~/data --models 4 --epochs 3"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("--dataset", choices=("digits", "mnist", "fashion-mnist", "cifar10"), default="digits",
                   help="digits (scikit-learn's 8x8 digits) needs no download or data root")
    p.add_argument("--data-root", default=None, metavar="PATH", help="data root for mnist/fashion-mnist/cifar10 (default: $AUTOALIGN_DATA)")
    p.add_argument("--models", type=int, default=4, metavar="N", help="number of models trained from different seeds")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="training epochs per model (default depends on the data set)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="folder for the table and the plot")
    p.add_argument("--seed", type=int, default=0, help="base seed (model i uses seed + i)")
    p.add_argument("--device", default=None, metavar="DEVICE", help="training device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.set_defaults(func=_cmd_demo)
    return parser


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the ``autoalign`` command line; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 when ``inspect``'s self-check fails, 2 for usage errors
        (``autoalign: error: ...`` on stderr, no traceback).
    """
    import warnings

    from .errors import AutoalignError

    def _show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse's own errors (status 2)
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    previous = warnings.showwarning
    warnings.showwarning = _show  # one line per warning, without source lines
    try:
        return int(args.func(args))
    except (CLIError, AutoalignError, ValueError, FileNotFoundError) as exc:
        return _error(str(exc).strip() or type(exc).__name__)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
