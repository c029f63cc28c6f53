"""The ``autoalign`` argument parser and the parsing of option values.

:func:`build_parser` describes every subcommand; the small parsers turn the
text of one option (a shape, ``key=value``, a list of numbers) into values.
Mistakes are raised as :class:`CLIError`, which :func:`autoalign.cli.main`
reports as one line ``autoalign: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["PROG", "DATA_HELP", "CLIError", "build_parser", "parse_shape", "parse_option", "parse_floats"]

PROG = "autoalign"

DATA_HELP = (
    "calibration data: digits | mnist[:ROOT] | fashion-mnist[:ROOT] | cifar10[:ROOT] (ROOT defaults to "
    "$AUTOALIGN_DATA) | imagefolder:PATH | tensor:FILE.pt (a saved tensor of inputs, or an (inputs, targets) pair)"
)


class CLIError(Exception):
    """A user mistake detected by the command line (reported without a traceback)."""


# ----------------------------------------------------------------------------- small parsers


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse the value of ``--input-shape``.

    Parameters
    ----------
    text : str
        Comma- or ``x``-separated positive integers, e.g. ``"2,3,64,64"`` or ``"2x3x64x64"``.

    Returns
    -------
    tuple of int
        ``(2, 3, 64, 64)`` for the examples above.

    Raises
    ------
    CLIError
        If a part is not an integer, or the shape is empty or not positive.
    """
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
    """Parse one ``--option key=value``.

    Parameters
    ----------
    text : str
        ``key=value``, e.g. ``"ridge=0.1"``.

    Returns
    -------
    key : str
        The option name (a Python identifier).
    value : Any
        Numbers, booleans (``true``/``yes``/``on``, ``false``/``no``/``off``),
        ``none`` and JSON lists or dicts are parsed; anything else stays a string:
        ``"ridge=0.1"`` → ``("ridge", 0.1)``.

    Raises
    ------
    CLIError
        If there is no ``=`` or the key is not an identifier.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise CLIError(f"--option must look like key=value (e.g. ridge=0.1), got {text!r}")
    return key, _parse_value(value)


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """Parse comma-separated numbers such as ``--mean 0.49,0.48,0.45``.

    Parameters
    ----------
    text : str
        The option's value.
    what : str
        The option's name, for the error message.

    Returns
    -------
    tuple of float
        One number per non-empty part.

    Raises
    ------
    CLIError
        If a part is not a number.
    """
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise CLIError(f"{what} must be comma-separated numbers, got {text!r}") from None


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
    """The argument parser of the ``autoalign`` command.

    Returns
    -------
    argparse.ArgumentParser
        Parses ``inspect``, ``aligners``, ``merge`` and ``demo`` with their
        options; ``args.command`` names the subcommand (see
        :data:`autoalign.cli.commands.COMMANDS`).
    """
    from .. import __version__

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
    p.add_argument("--tracer", choices=("auto", "fx", "export"), default="auto",
                   help="front end that turns the model into a graph: torch.fx symbolic tracing, torch.export "
                        "(models fx cannot trace, e.g. Hugging Face transformers), or auto: fx, then export if fx fails")
    p.add_argument("--leaf-module", metavar="NAME", action="append", default=[],
                   help="keep this submodule (qualified name) opaque when tracing; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the example input and of the self-check permutations")

    sub.add_parser(
        "aligners",
        help="list the registered aligners",
        description="List every registered aligner (built in and from plug-ins) with a one-line description.",
        epilog="example:\n  autoalign aligners",
        formatter_class=_Formatter,
    )

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
    p.add_argument("--tracer", choices=("auto", "fx", "export"), default="auto",
                   help="front end that turns the model into a graph: torch.fx symbolic tracing, torch.export "
                        "(models fx cannot trace, e.g. Hugging Face transformers), or auto: fx, then export if fx fails")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the merged checkpoint")
    p.add_argument("--device", default=None, metavar="DEVICE", help="compute device, e.g. cpu or cuda (default: where the models are loaded, the cpu)")
    p.add_argument("--quiet", dest="progress", action="store_false", default=True,
                   help="no progress display on stderr (by default one line names the stage, the batch and the model "
                        "being run, and a last line the seconds per stage; plain lines when stderr is not a terminal)")
    # the display is on by default now; --progress is still accepted (the last of the two wins)
    p.add_argument("--progress", dest="progress", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trust-checkpoints", action="store_true",
                   help="load checkpoints with full pickle (only for files you trust; default weights_only=True)")

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
    return parser
