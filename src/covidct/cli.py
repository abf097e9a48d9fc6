"""The ``covidct`` command: a thin layer over the Python API.

Every failure caused by input prints one line ``covidct: error: <path>: <reason>`` on stderr and
exits with status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from covidct import DISCLAIMER, __version__
from covidct.errors import CovidctError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _cmd_info(args: argparse.Namespace) -> int:
    from covidct.io import read
    from covidct.report.json_io import to_json

    info = read(args.path).summary()
    if args.json:
        print(to_json(info))
        return 0
    for key, value in info.items():
        if value is not None:
            print(f"{key:>16}: {value}")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from covidct.metrics import classification_report, parse_confusion, plot_confusion
    from covidct.report.json_io import to_json

    try:
        cm = parse_confusion(args.confusion)
    except ValueError as exc:
        raise CovidctError("--confusion", str(exc).split(": ", 1)[-1]) from None
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    if classes is None:
        classes = ["Control", "Common pneumonia", "COVID-19"] if cm.shape[0] == 3 else [f"class_{i}" for i in range(cm.shape[0])]
    if len(classes) != cm.shape[0]:
        raise CovidctError("--classes", f"{len(classes)} names for a {cm.shape[0]}x{cm.shape[0]} matrix")
    report = classification_report(cm, classes)
    if args.plot:
        plot_confusion(cm, classes, args.plot)
    if args.json:
        d = report.to_dict()
        print(to_json({"overall_accuracy": d["overall_accuracy"], "per_class": d["per_class"], "micro": d["micro"],
                       "classes": d["classes"], "confusion": d["confusion"],
                       "confusion_normalized": d["confusion_normalized"]}))
        return 0
    print(report.confusion_text())
    print(f"\noverall accuracy: {report.overall_accuracy:.4f}\n")
    print(report.table())
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from covidct.models.registry import list_models
    from covidct.report.json_io import to_json

    models = list_models()
    if args.json:
        print(to_json({"models": models}))
        return 0
    if not models:
        print("no shipped models")
    for m in models:
        val = m["metrics"].get("validation", {}).get("dice", {}) if isinstance(m["metrics"], dict) else {}
        dice = ", ".join(f"{k} {v:.3f}" for k, v in val.items() if v is not None)
        print(f"{m['name']:<24} task={m['task']:<8} input={m['input_size']} classes={','.join(m['classes'])}")
        if dice:
            print(f"{'':<24} validation Dice: {dice}")
    return 0


def _cmd_train_seg(args: argparse.Namespace) -> int:
    from covidct.engine.train_seg import SegTrainConfig, train_seg
    from covidct.report.json_io import to_json

    for d in args.data:
        if not Path(d).is_dir():
            raise CovidctError(d, "no such folder")
    cfg = SegTrainConfig(
        data=[str(d) for d in args.data], labels=args.labels, lung_head=not args.no_lung_head, arch=args.arch,
        encoder=args.encoder, input_size=args.input_size, imagenet=not args.random_init, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction, seed=args.seed, threads=args.threads,
        decoder_channels=tuple(int(c) for c in args.decoder_channels.split(",")),
    )
    result = train_seg(cfg, args.output, resume=not args.no_resume)
    print(to_json(result, disclaimer=False))
    return 0


def _cmd_evaluate_seg(args: argparse.Namespace) -> int:
    from covidct.engine.evaluate_seg import evaluate_seg, format_table
    from covidct.report.json_io import write_json

    t0 = time.time()
    result = evaluate_seg(args.model, args.data, split=args.split, tta=args.tta)
    print(format_table(result))
    print(f"Evaluation took {time.time() - t0:.1f} s")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from covidct.report.slices import predict_to_folder

    summary = predict_to_folder(args.paths, args.output, model_spec=args.model)
    print(f"wrote {3 * len(summary['slices'])} files for {len(summary['slices'])} slices to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="covidct", description=f"COVID-19 chest CT analysis. {DISCLAIMER}")
    p.add_argument("--version", action="version", version=f"covidct {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="describe a DICOM file/series, NIfTI volume or image")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("metrics", help="classification measures from a confusion matrix")
    s.add_argument("--confusion", required=True, help='rows ";"-separated, e.g. "423,8,0;10,336,5;0,11,207"')
    s.add_argument("--classes", help='comma-separated names (default for 3 classes: "Control,Common pneumonia,COVID-19")')
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", metavar="PNG", help="write a confusion-matrix picture")
    s.set_defaults(func=_cmd_metrics)

    s = sub.add_parser("models", help="list the shipped models")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_models)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="task", required=True)
    s = train.add_parser("seg", help="lesion (+ lung) segmentation")
    s.add_argument("--data", action="append", required=True, help="folder in the COVID-SemiSeg layout (repeatable; "
                   "validation comes from the first)")
    s.add_argument("--labels", choices=("masks", "masks4", "lung"), default="masks4")
    s.add_argument("--no-lung-head", action="store_true", help="do not learn the lung field")
    s.add_argument("--arch", choices=("unet", "fpn"), default="unet")
    s.add_argument("--encoder", default="efficientnet-lite0")
    s.add_argument("--decoder-channels", default="96,48,24,16,8")
    s.add_argument("--random-init", action="store_true", help="no ImageNet weights for the encoder")
    s.add_argument("--input-size", type=int, default=320)
    s.add_argument("--epochs", type=int, default=120)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--val-fraction", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--no-resume", action="store_true")
    s.add_argument("-o", "--output", required=True, help="model file to write (.pt)")
    s.set_defaults(func=_cmd_train_seg)

    evaluate = sub.add_parser("evaluate", help="evaluate a model on a data folder").add_subparsers(dest="task", required=True)
    s = evaluate.add_parser("seg", help="segmentation on a COVID-SemiSeg-layout folder")
    s.add_argument("--model", help="shipped model name or .pt file (default: the shipped segmentation model)")
    s.add_argument("--data", required=True)
    s.add_argument("--split", help="only slices of this manifest split")
    s.add_argument("--tta", action="store_true", help="average with a horizontally flipped pass")
    s.add_argument("--json", metavar="OUT", help="write the results as JSON")
    s.set_defaults(func=_cmd_evaluate_seg)

    s = sub.add_parser("predict", help="segment slices: label maps, lung masks, overlays")
    s.add_argument("paths", nargs="+")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("--model", help="shipped model name or .pt file")
    s.set_defaults(func=_cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CovidctError as exc:
        if args.debug:
            raise
        print(f"covidct: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidct: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        if args.debug:
            raise
        print(f"covidct: error: {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
