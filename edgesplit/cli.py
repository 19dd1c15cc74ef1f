"""The one command: ``edgesplit <verb>``.

This module only parses arguments, calls one function of the role that owns
the verb, and reports.  Roles are imported lazily so that ``edgesplit device``
on a Raspberry Pi never imports TensorFlow.  Errors raised on purpose
(:class:`protocol.errors.EdgesplitError`) print one message and exit with the
error's code; a traceback only with ``-v``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("edgesplit")


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")


# --------------------------------------------------------------------- verbs
# Each verb: an ``add_<verb>(subparsers)`` that registers its parser and sets
# ``func`` to a ``run_<verb>(args) -> int`` calling into the owning role.

def add_train(sub):
    p = sub.add_parser("train", help="train (or load from the cache) a model of the zoo and print its test accuracy")
    p.add_argument("model", help="zoo name, e.g. paper-cnn")
    p.add_argument("--epochs", type=int, default=None, help="override the zoo's epoch count")
    p.add_argument("--force", action="store_true", help="retrain even if a cached model exists")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    _quiet_tensorflow()
    from converter import zoo

    result = zoo.train(args.model, epochs=args.epochs, force=args.force)
    print(result.summary())
    return 0


def add_cuts(sub):
    p = sub.add_parser("cuts", help="list every valid cut of a model with its cost")
    p.add_argument("model", help="zoo name (e.g. paper-cnn) or a .keras file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_cuts)


def run_cuts(args) -> int:
    _quiet_tensorflow()
    from converter import cuts, zoo

    model = zoo.load_model(args.model)
    found = cuts.list_cuts(model)
    if args.json:
        print(json.dumps({"model": model.name, "cuts": [c.to_dict() for c in found]}, indent=2))
    else:
        print(cuts.format_table(found))
    return 0


def add_convert(sub):
    p = sub.add_parser("convert", help="split a model at a cut, quantize, check parity, write a bundle")
    p.add_argument("model", help="zoo name (e.g. paper-cnn) or a .keras file")
    p.add_argument("--cut", required=True, help="layer whose output is sent (see `edgesplit cuts MODEL`)")
    p.add_argument("--quant", choices=["int8", "float16", "dynamic", "none"], default="int8")
    p.add_argument("--calibration", type=int, default=500, metavar="N",
                   help="training images used to calibrate int8 quantization (default 500)")
    p.add_argument("--parity-n", type=int, default=2000, metavar="N",
                   help="held-out test images for the parity check (default 2000)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="fail when head+tail agree with Keras on fewer than this fraction of images "
                        "(default 0.99 for paper-cnn)")
    p.add_argument("--out", required=True, help="bundle directory to write (a .tar.gz is written beside it)")
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    _quiet_tensorflow()
    from converter import bundle

    result = bundle.convert(args.model, cut=args.cut, quant=args.quant, calibration=args.calibration,
                            out=args.out, min_agreement=args.min_agreement, parity_n=args.parity_n)
    print(result.summary())
    return 0


VERBS = [add_train, add_cuts, add_convert]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit",
        description="Split inference at the edge: cut a Keras model, run the head on a device, "
                    "the tail in the cloud, over MQTT; audit what each cut leaks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
                        stream=sys.stderr)
    from protocol.errors import EdgesplitError

    try:
        return int(args.func(args) or 0)
    except EdgesplitError as exc:
        if args.verbose:
            log.exception("failed")
        print(f"edgesplit {args.verb}: error: {exc.message}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"edgesplit {args.verb}: interrupted", file=sys.stderr)
        return 130
