"""The ``covidct`` command: a thin layer over the Python API.

Every failure caused by input prints one line ``covidct: error: <path>: <reason>`` on stderr and
exits with status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from covidct import DISCLAIMER, __version__
from covidct.errors import CovidctError, require_folder
from covidct.runtime import drop_unused_gpu_libraries, keep_freed_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _cmd_info(args: argparse.Namespace) -> int:
    from covidct.io import describe
    from covidct.report.json_io import to_json

    info = describe(args.path, series_uid=args.series or None)
    if info["kind"] == "dicom-study" and not args.json:
        print(f"{args.path}: {len(info['series'])} DICOM series (analyze takes the first, or of several with as many "
              f"images the least noisy; choose with --series UID)")
        for row in info["series"]:
            print(f"  {row['series_uid']}  {row.get('modality') or '?':<8} {row['n_images']:>5} images in "
                  f"{row['n_files']:>4} files  {row['plane']:<8}  {row['description']}"
                  + (f"  (kernel {row['kernel']})" if row.get("kernel") else ""))
        return 0
    if args.json:
        print(to_json(info))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        if value is not None:
            print(f"{key:>{width}}: {value}")
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
        print(f"{m['name']:<24} task={m['task']:<8} input={m['input_size']} classes={','.join(m['classes'])}")
        _print_metrics(m["metrics"], "")
        for role, companion in (m.get("companions") or {}).items():
            print(f"{'':<24} + {role} companion: {companion['arch']}, classes={','.join(companion['classes'])}")
            _print_metrics(companion["metrics"], "  ")
    return 0


def _print_metrics(metrics: Any, indent: str) -> None:
    """The validation / cross-validation / in-sample lines of one ``covidct models`` entry."""
    metrics = metrics if isinstance(metrics, dict) else {}
    for key, label in (("validation", "validation"), ("cross_validation", "cross-validation"),
                       ("in_sample", "in-sample")):
        block = metrics.get(key) or {}
        keys = ("ap50", "ap75", "map", "infection_dice") if "ap50" in block else ("accuracy", "auc")
        shown = block.get("dice") or {k: block[k] for k in keys if isinstance(block.get(k), float)}
        text = ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if isinstance(v, float))
        kind = "Dice" if "dice" in block else "instances" if "ap50" in block else "slices"
        if isinstance(block.get("data"), str):
            kind += f", {block['data']}"
        if text:
            print(f"{'':<24} {indent}{label} ({kind}): {text}")


def _parse_fold(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise CovidctError(None, f"--fold must be 'all' or a fold number, not {text!r}") from None


def _classifier_fold(args: argparse.Namespace) -> int:
    fold = _parse_fold(args.fold)
    if fold == "all":
        raise CovidctError(None, "classifiers need a validation fold (epoch and temperature): --fold 0..folds-1")
    return fold


def _add_classifier_fold_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--folds", type=int, default=0, help="k-fold: pool train + val, cut K patient-grouped folds "
                   "(0: the folder's val split, else a --seed share)")
    s.add_argument("--fold", default="0", help="which fold validates (0..folds-1); keep --seed equal across folds")


def _add_precision(s: argparse.ArgumentParser, whose: str = "segmentation network") -> None:
    s.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help=f"arithmetic of the {whose}: 'auto' = bfloat16 where the processor computes it natively "
                   "(AVX512-BF16 / AMX: about 1.6x faster; accuracy as float32 within noise, benchmarks/RESULTS.md), "
                   "else float32")


def _print_training_result(result: dict) -> None:
    """The training summary as JSON, once: under torchrun only rank 0 prints it."""
    from covidct.report.json_io import to_json

    if os.environ.get("RANK", "0") == "0":
        print(to_json(result, disclaimer=False))


def _cmd_train_seg(args: argparse.Namespace) -> int:
    from covidct.engine.train_seg import SegTrainConfig, train_seg

    for d in args.data:
        require_folder(d)
    if args.repeat_first < 1:
        raise CovidctError(None, "--repeat-first must be at least 1")
    data = [str(args.data[0])] * args.repeat_first + [str(d) for d in args.data[1:]]
    try:
        decoder_channels = tuple(int(c) for c in args.decoder_channels.split(","))
        fpn_channels = tuple(int(c) for c in args.fpn_channels.split(","))
    except ValueError:
        raise CovidctError(None, "--decoder-channels / --fpn-channels take comma-separated integers") from None
    if len(fpn_channels) != 2 or min(fpn_channels + decoder_channels) < 1 or fpn_channels[1] % 32:
        raise CovidctError(None, "--fpn-channels takes two positive integers: pyramid,segmentation (a multiple of 32)")
    from covidct.models.registry import resolve_model

    # --encoder-init / --init: a shipped name or a file, recorded in the training config as the file it named
    encoder_init = str(resolve_model(args.encoder_init, task="seg")) if args.encoder_init else ""
    init = str(resolve_model(args.init, task="seg")) if args.init else ""
    cfg = SegTrainConfig(
        data=data, labels=args.labels, warmup_epochs=args.warmup_epochs, lung_head=not args.no_lung_head, arch=args.arch,
        encoder=args.encoder, input_size=args.input_size, imagenet=not args.random_init, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, encoder_lr_scale=args.encoder_lr_scale, val_fraction=args.val_fraction, seed=args.seed, threads=args.threads,
        folds=args.folds, fold=_parse_fold(args.fold), select=args.select, class_weighting=args.class_weighting,
        decoder_channels=decoder_channels, fpn_channels=fpn_channels, swa_epochs=args.swa_epochs,
        encoder_init=encoder_init, init=init, infection_dice_weight=args.infection_dice_weight,
        copy_paste=args.copy_paste, quarter_turns=args.quarter_turns, data_orientation=args.data_orientation,
        train_limit=args.train_limit, loss=args.loss, lung_crop=args.lung_crop,
    )
    _print_training_result(train_seg(cfg, args.output, resume=not args.no_resume))
    return 0


def _print_input_notes(notes: list[dict[str, str]]) -> None:
    """``note: INPUT: ...`` for each input note of ``classify`` / ``predict`` (report.slices.input_notes)."""
    for note in notes:
        print(f"note: {note['input']}: {note['note']}")


def _note_images_without_mask(data: str, result: dict) -> None:
    """One stderr line when some images of a segmentation folder had no label map and were left out."""
    missing = result.get("images_without_mask") or []
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(f"note: {data}: {len(missing)} image(s) without a label map of the same name were not evaluated "
              f"({shown})", file=sys.stderr)


def _cmd_evaluate_seg(args: argparse.Namespace) -> int:
    from covidct.engine.evaluate_seg import evaluate_seg, format_table
    from covidct.io import to_model_input
    from covidct.report.json_io import write_json
    from covidct.report.overlay import labels_comparison, save_png

    t0 = time.time()
    overlays, draw = (Path(args.overlays) if args.overlays else None), None   # checked by check_output_options
    if overlays is not None:
        def draw(sample, prediction):   # truth | prediction for every evaluated slice
            overlays.mkdir(parents=True, exist_ok=True)
            save_png(labels_comparison(to_model_input(sample.image, is_hu=False), sample.labels, prediction.labels,
                                       truth_lung=sample.lung, predicted_lung=prediction.lung,
                                       title=sample.id + ("" if sample.has_types else " (truth: binary infection mask, drawn red)")),
                     overlays / f"{sample.id}.png")
    result = evaluate_seg(args.model, args.data, split=args.split, tta=args.tta,
                          density_classes=not args.network_classes, on_prediction=draw, precision=args.precision)
    print(format_table(result))
    if result["binary_masks"]:
        print(f"note: {Path(args.data) / 'masks'} holds binary infection masks (0 / 255): infection is scored, "
              "GGO and consolidation are not")
    _note_images_without_mask(args.data, result)
    print(f"Evaluation took {time.time() - t0:.1f} s")
    if overlays is not None:
        print(f"wrote {result['n_images']} overlays (truth | predicted) to {overlays}")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_train_cls(args: argparse.Namespace) -> int:
    from covidct.engine.train_cls import ClsTrainConfig, train_cls
    from covidct.models.registry import resolve_model

    require_folder(args.data)
    # --init: imagenet, random, or a segmentation model (shipped name or file)
    init = args.init if args.init in ("imagenet", "random") else str(resolve_model(args.init, task="seg"))
    cfg = ClsTrainConfig(data=str(args.data), n_classes=args.classes, encoder=args.encoder, init=init,
                         input_size=args.input_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, folds=args.folds, fold=_classifier_fold(args))
    _print_training_result(train_cls(cfg, args.output))
    return 0


def _cmd_evaluate_cls(args: argparse.Namespace) -> int:
    from covidct.engine.evaluate_cls import evaluate_cls
    from covidct.metrics import plot_confusion
    from covidct.report.json_io import write_json

    t0 = time.time()
    specs = args.model if args.model and len(args.model) > 1 else (args.model[0] if args.model else None)
    if _is_triage(specs, args.data):
        from covidct.analysis.triage import evaluate_triage

        if args.tta or args.split:
            raise CovidctError(None, "--tta and --split do not apply to a triage model (CT volumes)")
        result = evaluate_triage(specs, args.data, context=args.slice_context, precision=args.precision)
        print(f"model: {result['model']} (3-class CT triage: lesions decide pneumonia or not, the classifier "
              f"COVID-19 or not, for each slice by its {result['slice_context']})")
    else:
        result = evaluate_cls(specs, args.data, split=args.split, tta=args.tta)
    report = result["_report"]
    print(report.confusion_text())
    print(f"\noverall accuracy: {report.overall_accuracy:.4f}")
    auc = result["auc"]
    print("ROC AUC: " + (f"{auc:.4f}" if isinstance(auc, float) else ", ".join(f"{k} {v:.4f}" for k, v in auc.items())))
    print(f"\n{report.table()}\n")
    if "ct_slice_targets" in result:
        t = {k: "n/a" if v is None else f"{v:.4f}" for k, v in result["ct_slice_targets"].items()}
        print(f"COVID-19 sensitivity {t['covid_sensitivity']}; Control slices not called COVID-19 "
              f"{t['control_not_covid']}, called Control {t['control_called_control']}")
    if result.get("in_sample_patients"):
        print(f"note: the triage's shift was fitted on {', '.join(result['in_sample_patients'])}: in-sample for them")
    print(f"{result['n_images']} images, {result['images_per_second']} images/s")
    print(f"Evaluation took {time.time() - t0:.1f} s")
    if args.plot:
        plot_confusion(report.confusion, report.classes, args.plot)
    if args.json:
        write_json({k: v for k, v in result.items() if not k.startswith("_")}, args.json)
        print(f"wrote {args.json}")
    return 0


def _is_triage(spec, data: str) -> bool:
    """Whether ``evaluate cls`` runs a CT triage model: one named on the command line, or the shipped
    one when no model is named and ``data`` holds CT volumes (COVID-CT-MD layout)."""
    from covidct.analysis.triage import is_triage_model
    from covidct.data.classification import detect_layout

    if spec is None:
        return Path(data).is_dir() and detect_layout(data) == "covid-ct-md"
    return not isinstance(spec, list) and is_triage_model(spec)


def _cmd_train_triage(args: argparse.Namespace) -> int:
    from covidct.analysis.triage import fit_triage
    from covidct.report.json_io import to_json

    print(to_json(fit_triage(args.data, args.output, classifier=args.classifier, seg_model=args.model),
                  disclaimer=False))
    return 0


def _explained_model(spec: str | None, *, allow_maskcls: bool):
    """The classifier to explain: a CNN or an ensemble with CNN members (class activation maps) or,
    where allowed, a Mask-Net classifier (its RoIs); default: the shipped ``cam`` model."""
    from covidct.engine.explain import cam_members
    from covidct.models.maskcls import MaskClsNet
    from covidct.models.registry import DEFAULTS, load_cls_model

    model, payload = load_cls_model(spec or DEFAULTS["cam"])
    if allow_maskcls and isinstance(model, MaskClsNet):
        return model, payload
    try:
        cam_members(model)
    except ValueError:
        raise CovidctError(payload["path"], "class activation maps need a CNN classifier or an ensemble with CNN "
                           "members" + (" (or a Mask-Net classifier: its RoIs)" if allow_maskcls else "")) from None
    return model, payload


def _cmd_explain(args: argparse.Namespace) -> int:
    import numpy as np

    from covidct.engine.explain import cam_members, class_activation_map, maskcls_evidence
    from covidct.io import classifier_input, read
    from covidct.models.maskcls import MaskClsNet
    from covidct.report.overlay import heatmap_rgb, instances_rgb, save_png, with_legend

    vol = read(args.image)
    model, payload = _explained_model(args.model, allow_maskcls=True)
    classes = list(model.config.classes)
    if args.target and args.target not in classes:
        raise CovidctError("--class", f"{args.target!r} is not one of {classes}")
    index = classes.index(args.target) if args.target else None
    k = vol.n_slices // 2 if args.slice is None else args.slice
    grey = classifier_input(vol.array[k], is_hu=vol.is_hu)  # CT: cropped to the body, as classified
    if isinstance(model, MaskClsNet):  # its evidence is the RoIs it reads, not a heat map
        boxes, scores, probs = maskcls_evidence(model, grey, temperature=float(payload.get("temperature", 1.0)))
        title = f"{len(scores)} RoIs read by S (score >= 0.05); " + ", ".join(f"{c} {p:.2f}" for c, p in zip(classes, probs))
        picture = instances_rgb(grey, np.zeros((0, *grey.shape), bool), ["lesion"] * len(scores),
                                [float(v) for v in scores], boxes)
        save_png(with_legend(np.asarray(picture), names=(), title=title), args.output)
    else:
        cam, probs = class_activation_map(model, grey, class_index=index, method=args.method)
        n_maps = len(cam_members(model))
        title = (f"{args.method} for {classes[index if index is not None else -1]}"
                 + (f" (mean of {n_maps} CNN members' maps)" if n_maps > 1 else "")
                 + "; " + ", ".join(f"{c} {p:.2f}" for c, p in zip(classes, probs)))
        save_png(with_legend(heatmap_rgb(grey, cam), names=(), title=title), args.output)
    print(title)
    print(f"wrote {args.output}")
    return 0


def _cmd_evaluate_cam(args: argparse.Namespace) -> int:
    from covidct.data.segmentation import SegFolder
    from covidct.engine.explain import evaluate_weak_masks
    from covidct.report.json_io import write_json

    model, _ = _explained_model(args.model, allow_maskcls=False)
    result = evaluate_weak_masks(model, SegFolder(args.data), threshold=args.threshold, method=args.method,
                                 density=args.density)
    pooled, per_image = result["details"]["pooled"]["infection"], result["details"]["mean_per_image"]["infection"]
    refined = ", refined to > -700 HU" if args.density else ""
    print(f"weakly-supervised infection masks ({args.method}, threshold {args.threshold}{refined}) on {result['n_images']} slices")
    for name, row in (("pooled", pooled), ("mean per image", per_image)):
        print(f"{name:>15}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    print(f"rand error: {result['rand_error']:.4f}")
    if args.json:
        write_json(result, args.json)
    return 0


def _cmd_train_lesions(args: argparse.Namespace) -> int:
    from covidct.engine.lesions import LesionTrainConfig, train_lesions

    for d in args.data:
        require_folder(d)
    model = {"backbone": args.backbone, "mask_mode": args.mask_mode, "input_size": args.input_size,
             "truncate_last_stage": args.truncate_last_stage}
    for name in ("box_head_dim", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_batch_size_per_image",
                 "box_batch_size_per_image"):
        if getattr(args, name) is not None:   # range checked by check_numeric_options
            model[name] = getattr(args, name)
    init = None if args.init == "imagenet" else args.init
    if init:
        from covidct.models.registry import resolve_model

        init = str(resolve_model(init, task="seg"))
    cfg = LesionTrainConfig(data=[str(d) for d in args.data], model=model, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed, encoder_init=init)
    _print_training_result(train_lesions(cfg, args.output))
    return 0


def _cmd_train_maskcls(args: argparse.Namespace) -> int:
    from covidct.engine.train_maskcls import MaskClsTrainConfig, train_maskcls

    require_folder(args.data)
    cfg = MaskClsTrainConfig(data=str(args.data), lesion_model=args.lesion_model, n_classes=args.classes,
                             top_n=args.top_n, s_width=args.s_width, train=args.train,
                             roi_features=tuple(args.roi_features), epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed, folds=args.folds,
                             fold=_classifier_fold(args))
    _print_training_result(train_maskcls(cfg, args.output))
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from covidct.engine.evaluate_cls import save_ensemble
    from covidct.report.json_io import to_json

    if args.data is not None:
        require_folder(args.data)
    if args.out_of_fold and args.data is None:
        raise CovidctError(None, "--out-of-fold needs --data (the folder the fold models were trained on)")
    print(to_json(save_ensemble(args.model, args.output, data=args.data, split=args.split, out_of_fold=args.out_of_fold,
                                tta=args.tta), disclaimer=False))
    return 0


def _cmd_attach(args: argparse.Namespace) -> int:
    from covidct.models.checkpoint import attach_companions
    from covidct.models.registry import resolve_model

    given = {role: spec for role, spec in (("effusion", args.effusion), ("lung_masked", args.lung_masked)) if spec}
    if not given:
        raise CovidctError(None, "nothing to attach: give --effusion FILE and/or --lung-masked FILE")
    main_path = resolve_model(args.model, task="seg")
    files = {role: resolve_model(spec, task="seg") for role, spec in given.items()}
    out = attach_companions(main_path, files, output=args.output)
    inside = " and ".join(f"the {role.replace('_', '-')} model {p.name}" for role, p in files.items())
    print(f"wrote {out}: {main_path.name} with {inside} inside")
    return 0


def _cmd_evaluate_lesions(args: argparse.Namespace) -> int:
    from covidct.engine.lesions import INSTANCE_SCORE, evaluate_lesions
    from covidct.io import to_model_input
    from covidct.report.json_io import write_json
    from covidct.report.overlay import instances_comparison, save_png

    t0 = time.time()
    overlays, draw = (Path(args.overlays) if args.overlays else None), None   # checked by check_output_options
    if overlays is not None:
        def draw(sample, prediction, truth, classes):   # truth | prediction for every evaluated slice
            overlays.mkdir(parents=True, exist_ok=True)
            save_png(instances_comparison(to_model_input(sample.image, is_hu=False), truth, prediction, classes,
                                          min_score=INSTANCE_SCORE, title=sample.id), overlays / f"{sample.id}.png")
    result = evaluate_lesions(args.model, args.data, split=args.split, on_prediction=draw, precision=args.precision)
    print(f"{'class':<16}{'AP50':>10}{'AP75':>10}{'mAP':>10}")
    rows = [("all", {k: result[k] for k in ("ap50", "ap75", "map")}), *result["per_class"].items()]
    for name, r in rows:
        print(f"{name:<16}" + "".join(f"{'n/a' if r[k] is None else f'{r[k]:.4f}':>10}" for k in ("ap50", "ap75", "map")))
    if result.get("infection_dice") is not None:
        print(f"lesion region Dice (union of instances scoring >= {result['instance_score_threshold']}): "
              f"{result['infection_dice']:.4f}")
    print(f"{result['n_images']} images, {result['images_per_second']} images/s")
    _note_images_without_mask(args.data, result)
    print(f"Evaluation took {time.time() - t0:.1f} s")
    if overlays is not None:
        print(f"wrote {result['n_images']} overlays (truth | predicted instances) to {overlays}")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from covidct.report.json_io import write_json
    from covidct.report.slices import classify_paths

    result = classify_paths(args.paths, model_spec=args.model, precision=args.precision)
    for row in result["slices"]:
        probs = ", ".join(f"{c} {v:.3f}" for c, v in row["probabilities"].items())
        print(f"{row['input']} [{row['slice']}]: {row['label']} ({probs})")
    _print_input_notes(result["notes"])
    print(f"model {result['model']}; {DISCLAIMER}")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_pretrain_seg(args: argparse.Namespace) -> int:
    from covidct.engine.pretrain_seg import PretrainConfig, pretrain_seg

    try:
        decoder_channels = tuple(int(c) for c in args.decoder_channels.split(","))
    except ValueError:
        raise CovidctError(None, "--decoder-channels takes comma-separated integers") from None
    cfg = PretrainConfig(data=[str(d) for d in args.data], split=args.split or None, encoder=args.encoder,
                         decoder_channels=decoder_channels, input_size=args.input_size, imagenet=not args.random_init,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads)
    summary = pretrain_seg(cfg, args.output)
    print(f"pretrained on {summary['n_images']} images in {summary['seconds']:.0f} s (restoration MSE "
          f"{summary['train_mse']:.4f}) -> {summary['output']}; use it with covidct train seg --init")
    return 0


def _cmd_pseudolabel(args: argparse.Namespace) -> int:
    from covidct.engine.pseudolabel import pseudo_label

    summary = pseudo_label(args.model, args.data, args.output, split=args.split or None,
                           min_lung_fraction=args.min_lung_fraction)
    print(f"{summary['n_written']} of {summary['n_sources']} slices pseudo-labelled by {summary['teacher']} "
          f"({summary['n_skipped']} skipped: no lungs found) -> {summary['output']}")
    print(DISCLAIMER)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from covidct.report.slices import predict_to_folder

    if not 0.0 <= args.lesion_score <= 1.0:
        raise CovidctError(None, f"--lesion-score must be in [0, 1], got {args.lesion_score}")
    summary = predict_to_folder(args.paths, args.output, model_spec=args.model, lesion_model_spec=args.lesion_model,
                                lesion_score=args.lesion_score, precision=args.precision)
    from covidct.report.notes import noise_note

    for item in summary["inputs"]:
        if (item["orientation_check"] or {}).get("note"):
            print(f"note: {item['input']}: {item['orientation_check']['note']}")
        if note := noise_note(item.get("noise")):
            print(f"note: {item['input']}: {note}")
    _print_input_notes(summary["notes"])
    per_slice = 3 + (1 if args.lesion_model else 0)
    print(f"wrote {per_slice * len(summary['slices'])} files for {len(summary['slices'])} slices to {args.output}")
    return 0


def _optional_model(text: str | None, default: str) -> str | None:
    """``--classifier`` / ``--triage`` of ``analyze``: unset = ``default``, ``none`` = none."""
    return default if text is None else None if text == "none" else text


def _cmd_compare(args: argparse.Namespace) -> int:
    from covidct.report.compare import compare, format_comparison
    from covidct.report.json_io import write_json

    result = compare(args.before, args.after)
    print(f"before: {result['before']}\nafter:  {result['after']}")
    print(format_comparison(result))
    print(DISCLAIMER)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from covidct.serve import make_server, start_page

    server = make_server(args.folder, host=args.host, port=args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.folder} at http://{host}:{port}/{start_page(args.folder)} (Ctrl-C to stop)")
    print(DISCLAIMER)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _analyze_batch(args: argparse.Namespace, specs: dict) -> int:
    """``analyze`` with several inputs (or ``--series all``): OUTDIR/<name>/ each, models loaded once,
    OUTDIR/summary.csv + summary.json; a failing scan is one error line and the others go on (exit 2)."""
    from covidct.report.batch import analyze_many, scan_jobs
    from covidct.report.json_io import to_json
    from covidct.report.scan_report import ScanModels

    jobs = scan_jobs(args.path, series=args.series)
    models = ScanModels(specs["model_spec"], device=specs["device"], classifier_spec=specs["classifier_spec"],
                        triage_spec=specs["triage_spec"], precision=specs["precision"])

    def said(i: int, job, row: dict) -> None:
        if row["status"] != "ok":
            print(f"covidct: error: {row['error']}", file=sys.stderr)
        elif not args.json:
            print(f"[{i + 1}/{len(jobs)}] {job.name}: {row['answer']}, lesions {row['total_percent']:.2f} % of lung, "
                  f"severity {row['severity_score']}, {row['seconds']:.1f} s")
            for note in row["notes"]:
                print(f"    note: {note}")

    rows = analyze_many(jobs, args.output, models=models, on_scan=said, window=args.window,
                        viewer=not args.no_viewer, dicom_seg=args.dicom_seg, slice_orientation=args.slice_orientation,
                        reorient=args.reorient == "anatomy", denoise=args.denoise == "auto")
    failed = sum(r["status"] != "ok" for r in rows)
    if args.json:
        print(to_json({"scans": rows}))
    else:
        print(f"wrote {len(rows) - failed} of {len(rows)} scans to {args.output}/<name>/ and "
              f"{args.output}/summary.csv, summary.json ({failed} failed); browse: covidct serve {args.output}")
        print(DISCLAIMER)
    return 2 if failed else 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from covidct.io import get_window
    from covidct.io.read_ahead import ReadAhead

    try:
        get_window(args.window)
    except ValueError as exc:
        raise CovidctError(None, f"--window: {exc}") from None
    batch = len(args.path) > 1 or args.series == "all"
    # one scan: read it in a helper process while PyTorch and the models load here (benchmarks/RESULTS.md;
    # in a batch the helper would compete with the analysis for the cores: no gain, measured)
    if args.device != "cpu":   # before any reading (the cpu default needs no check, nor torch imported early)
        from covidct.engine.common import check_device

        check_device(args.device)
    pending = None if batch else ReadAhead(args.path[0], series_uid=args.series, largest_series=True, progress=True)
    with pending or nullcontext():
        _drop_unused_gpu_libraries()   # after the helper has started, so that it reads while torch loads
        _precision_note(args)
        from covidct.models.registry import DEFAULTS
        from covidct.report.notes import report_notes
        from covidct.report.scan_report import analyze

        if pending is not None:   # the 2 s of imports above are usually enough to find a bad input: no model loaded
            pending.raise_if_failed()

        specs = dict(model_spec=args.model, device=args.device, precision=args.precision,
                     classifier_spec=_optional_model(args.classifier, "auto"),
                     triage_spec=_optional_model(args.triage, DEFAULTS["triage"]))
        if batch:
            return _analyze_batch(args, specs)
        report = analyze(args.path[0], args.output, series_uid=args.series, window=args.window,
                         viewer=not args.no_viewer, dicom_seg=args.dicom_seg,
                         slice_orientation=args.slice_orientation, reader=pending.result,
                         reorient=args.reorient == "anatomy", denoise=args.denoise == "auto", **specs)
    from covidct.report.json_io import to_json

    if args.json:
        print(to_json(report))
        return 0
    les = report["lesions"]
    lung = report["lung_volume_ml"]
    for note in report_notes(report):
        print(f"note: {note}")
    if args.triage not in (None, "none") and report["input"]["spacing_mm"] is None:
        print("note: --triage was not used: the CT triage needs a pixel spacing, which this input has not (an "
              "image); the answer is the lesion-only one")
    print(f"lung volume: {'n/a' if lung is None else f'{lung:.0f} mL'}")
    for name in ("ggo", "consolidation", "effusion", "total"):
        ml = les[name]["volume_ml"]
        print(f"{name:>14}: {'' if ml is None else f'{ml:8.1f} mL '}{les[name]['percent_of_lung']:6.2f} % of lung")
    print(f"severity score (zone-based): {report['severity_score']}/{report['severity_score_max']}")
    probs = dict(report["diagnosis"]["probabilities"])
    lesions_p = probs.pop("lesions_present", None)
    shown = [f"{k} {v:.3f}" for k, v in probs.items()]
    if lesions_p is not None:
        shown.append(f"p(lesions present) {lesions_p:.3f}")
    print(f"answer: {report['diagnosis']['label']} ({', '.join(shown)})")
    viewer = ", viewer.html" if not args.no_viewer else ""
    seg = report.get("dicom_seg") or {}
    if seg.get("note"):
        print(seg["note"] if seg["note"].startswith("lesions.seg.dcm") else f"DICOM SEG {seg['note']}")
    seg_name = "".join(f", {seg[k]}" for k in ("file", "lungs_file") if seg.get(k))
    precision = report["models"][0].get("precision") if report.get("models") else None
    print(f"wrote {args.output}/report.html, report.json{viewer}, lesions.nii.gz{seg_name}, lungs.nii.gz, overlays/ "
          f"in {report['seconds']} s" + (f" (segmentation in {precision})" if precision else ""))
    print(DISCLAIMER)
    return 0


def _add_training_options(s: argparse.ArgumentParser, *, epochs: int | None, batch_size: int | None, lr: float | None) -> None:
    """Options every ``covidct train`` task shares."""
    s.add_argument("--epochs", type=int, default=epochs,
                   help=None if epochs is not None else "default: 300 for --train s, 15 for s+bn, 40 for s+roi")
    if batch_size is not None:
        s.add_argument("--batch-size", type=int, default=batch_size)
    if lr is not None:
        s.add_argument("--lr", type=float, default=lr)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True, help="model file to write (.pt)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="covidct", description=f"COVID-19 chest CT analysis. {DISCLAIMER}")
    p.add_argument("--version", action="version", version=f"covidct {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="describe a DICOM file/series, NIfTI volume or image; a folder of several "
                       "DICOM series: list them")
    s.add_argument("path")
    s.add_argument("--series", help="SeriesInstanceUID: describe this series of a folder that holds several")
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
    s.add_argument("--labels", choices=("masks", "masks4", "effusion", "lung"), default="masks4")
    s.add_argument("--no-lung-head", action="store_true", help="do not learn the lung field")
    s.add_argument("--arch", choices=("unet", "unetplusplus", "fpn"), default="unet")
    s.add_argument("--encoder", default="efficientnet-lite0")
    s.add_argument("--decoder-channels", default="96,48,24,16,8", help="U-Net decoder channels")
    s.add_argument("--fpn-channels", default="256,128", help="FPN decoder: pyramid,segmentation-head channels")
    s.add_argument("--random-init", action="store_true", help="no ImageNet weights for the encoder")
    s.add_argument("--input-size", type=int, default=320)
    _add_training_options(s, epochs=120, batch_size=8, lr=2e-3)
    s.add_argument("--encoder-lr-scale", type=float, default=1.0, help="encoder learning rate = lr x this")
    s.add_argument("--init", metavar="MODEL", default="", help="start the whole network from a covidct pretrain seg "
                   "file (all but its output head) or a trained segmentation model, shipped name or .pt file (fine-tuning:"
                   " its output head too when its classes and lung head are this network's); same encoder, decoder channels")
    s.add_argument("--encoder-init", metavar="MODEL", help="start the encoder from this covidct segmentation or "
                   "classification model (shipped name or .pt file) with the same --encoder, instead of ImageNet")
    s.add_argument("--warmup-epochs", type=float, default=3.0, help="linear learning-rate warm-up (epochs, may be "
                   "fractional), then cosine decay")
    s.add_argument("--repeat-first", type=int, default=1, metavar="N", help="the first --data folder's training "
                   "slices N times per epoch (e.g. labelled slices beside a larger pseudo-labelled folder)")
    s.add_argument("--val-fraction", type=float, default=0.2)
    s.add_argument("--folds", type=int, default=0, help="k-fold cross-validation: number of folds (0: one "
                   "--val-fraction split)")
    s.add_argument("--fold", default="0", help="which fold validates (0..folds-1), or 'all': train on every "
                   "slice, no validation, keep the last epoch")
    s.add_argument("--class-weighting", choices=("none", "sqrt-inverse"), default="none",
                   help="cross-entropy class weights from the training pixel frequencies")
    s.add_argument("--infection-dice-weight", type=float, default=0.0, metavar="W", help="add W x a soft Dice "
                   "loss on the infection region (GGO + consolidation summed against their union); 0: off")
    s.add_argument("--loss", choices=("dice", "lovasz"), default="dice", help="overlap term beside the "
                   "cross-entropy on the lesion classes: soft Dice (foreground classes) or Lovász-softmax")
    s.add_argument("--train-limit", type=int, default=0, metavar="N", help="learning curves: train on N of the "
                   "training slices (a seeded draw; validation unchanged)")
    s.add_argument("--data-orientation", choices=("anterior-left", "anterior-up"), default="anterior-left",
                   help="orientation of the training slices, stored in the model so that covidct analyze turns CT "
                   "slices to match (COVID-SemiSeg / MedSeg: anterior-left)")
    s.add_argument("--quarter-turns", action="store_true", help="also transpose half the training slices, so that "
                   "with the flips they appear in all eight orientations (default: flips only)")
    s.add_argument("--copy-paste", type=float, default=0.0, metavar="P", help="lesion copy-paste: this share of "
                   "training slices first receive the GGO / consolidation of another training slice, laid into "
                   "their lung field; 0: off")
    s.add_argument("--lung-crop", action="store_true", help="cut training slices framed wider than their lungs "
                   "(MedSeg 512² frames) to their lung/ box, as prediction's second pass cuts such slices")
    s.add_argument("--select", choices=("best", "last"), default="best", help="keep the best validation epoch "
                   "or the last one (always the last with --fold all)")
    s.add_argument("--swa-epochs", type=int, default=0, metavar="N", help="stochastic weight averaging: the model "
                   "is the mean of the weights after each of the last N epochs, BatchNorm statistics recomputed "
                   "(needs --select last)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--no-resume", action="store_true")
    s.set_defaults(func=_cmd_train_seg)

    s = train.add_parser("cls", help="slice classifier (binary COVID / NonCOVID or 3-class)")
    s.add_argument("--data", required=True, help="classification folder (split.csv, COVID-CT-MD, COVIDx-CT names, folder per class)")
    s.add_argument("--classes", type=int, choices=(2, 3), default=2)
    s.add_argument("--encoder", default="efficientnet-lite0")
    s.add_argument("--init", default="imagenet", help="random, imagenet, or a covidct segmentation model (shipped name or file): its encoder")
    s.add_argument("--input-size", type=int, default=224)
    _add_classifier_fold_options(s)
    _add_training_options(s, epochs=30, batch_size=16, lr=1e-3)
    s.set_defaults(func=_cmd_train_cls)

    s = train.add_parser("lesions", help="Mask R-CNN lesion instances (COVID-CT-Mask-Net stage 1)")
    s.add_argument("--data", action="append", required=True, help="COVID-SemiSeg-layout folder (repeatable)")
    s.add_argument("--mask-mode", choices=("ggo", "merge", "both"), default="both")
    s.add_argument("--backbone", choices=("resnet18", "resnet34", "resnet50", "efficientnet-lite0", "efficientnet-lite1",
                                          "efficientnet-lite2"), default="efficientnet-lite0")
    s.add_argument("--truncate-last-stage", action="store_true")
    s.add_argument("--input-size", type=int, default=320)
    # training-time cost settings of the Mask R-CNN; unset = the cheap defaults of LesionModelConfig
    for flag, ours, theirs, what in (
            ("--box-head-dim", 128, 1024, "width of the TwoMLPHead box head (the paper's 128)"),
            ("--rpn-pre-nms-top-n-train", 1000, 2000, "RPN proposals per FPN level before NMS in training"),
            ("--rpn-post-nms-top-n-train", 500, 2000, "RPN proposals kept after NMS in training"),
            ("--rpn-batch-size-per-image", 128, 256, "anchors sampled per image for the RPN loss"),
            ("--box-batch-size-per-image", 128, 512, "RoIs sampled per image for the box and mask heads")):
        s.add_argument(flag, type=int, default=None, help=f"{what} (default {ours}; torchvision's: {theirs})")
    _add_training_options(s, epochs=40, batch_size=4, lr=1e-3)
    s.add_argument("--init", default="imagenet", help="backbone start (EfficientNet-Lite): imagenet, or a "
                   "segmentation model (shipped name or .pt) with the same encoder")
    s.set_defaults(func=_cmd_train_lesions)

    s = train.add_parser("maskcls", help="COVID-CT-Mask-Net classifier (S on the top-N RoIs of a lesion model)")
    s.add_argument("--data", required=True)
    s.add_argument("--lesion-model", help="trained lesion model: shipped name or file")
    s.add_argument("--classes", type=int, choices=(2, 3), default=2)
    s.add_argument("--top-n", type=int, default=32, help="RoIs per image (N of the N x 5 tensor)")
    s.add_argument("--s-width", type=int, default=128)
    s.add_argument("--roi-features", nargs="*", default=[], choices=("label", "embedding"),  # = models.maskcls.ROI_FEATURES
                   help="what S reads besides the published N x 5 tensor: label = each RoI's one-hot lesion class "
                   "(GGO / consolidation), as columns after its box and score; embedding = the box head's features of "
                   "the kept detections, pooled (score-weighted mean and maximum)")
    s.add_argument("--train", choices=("s", "s+bn", "s+roi"), default="s",
                   help="what to train: s = the classification module S only; s+bn = S and the backbone's "
                   "batch-norm affine parameters; s+roi = S, box head and box predictor")
    _add_classifier_fold_options(s)
    _add_training_options(s, epochs=None, batch_size=16, lr=1e-3)
    s.set_defaults(func=_cmd_train_maskcls)

    s = train.add_parser("triage", help="3-class CT triage: fit the COVID-19 shift of a slice classifier on CT "
                         "volumes (COVID-CT-MD layout; see covidct.analysis.triage)")
    s.add_argument("--data", required=True, help="COVID-CT-MD-layout folder with COVID-19 and CAP patients")
    s.add_argument("--classifier", help="binary slice classifier (default: the shipped default classifier)")
    s.add_argument("--model", help="segmentation model (default: the shipped one)")
    s.add_argument("-o", "--output", required=True, help="model file to write (.pt)")
    s.set_defaults(func=_cmd_train_triage)

    s = sub.add_parser("ensemble", help="combine classifiers into one model file (mean of calibrated probabilities)")
    s.add_argument("--model", action="append", required=True, help="member classifier (shipped name or .pt), repeat")
    s.add_argument("--data", help="score the ensemble on this classification folder and store it as validation")
    s.add_argument("--split", default="val", help="split of --data to score (default: val)")
    s.add_argument("--out-of-fold", action="store_true", help="the members are k-fold models of --data (train cls "
                   "--folds): score their out-of-fold predictions and fit a temperature and class offsets there")
    s.add_argument("-o", "--output", required=True, help="model file to write (.pt)")
    s.add_argument("--tta", action="store_true", help="the ensemble averages each member over the input and its "
                   "left-right mirror image (scored and calibrated that way)")
    s.set_defaults(func=_cmd_ensemble)

    s = sub.add_parser("attach", help="store companion networks inside a segmentation model file: a "
                       "pleural-effusion model that the predictor runs beside the main network and lets decide "
                       "effusion, and/or a model that segments slices blacked out outside their lungs")
    s.add_argument("--model", required=True, help="the main segmentation model (shipped name or .pt)")
    s.add_argument("--effusion", help="a segmentation model that predicts effusion "
                   "(e.g. covidct train seg --labels effusion); a file that carries an effusion companion "
                   "(e.g. seg-effl0-unet) gives that companion")
    s.add_argument("--lung-masked", help="a segmentation model (same lesion classes, with a lung head) that "
                   "segments, instead of the main one, the slices found black outside their lungs (e.g. "
                   "train seg --data covid-semiseg --data medseg-512 --lung-crop); a file that carries such a "
                   "companion gives that companion")
    s.add_argument("-o", "--output", required=True, help="model file to write (.pt)")
    s.set_defaults(func=_cmd_attach)

    evaluate = sub.add_parser("evaluate", help="evaluate a model on a data folder").add_subparsers(dest="task", required=True)
    s = evaluate.add_parser("seg", help="segmentation on a COVID-SemiSeg-layout folder")
    s.add_argument("--model", help="shipped model name or .pt file (default: the shipped segmentation model)")
    s.add_argument("--data", required=True)
    s.add_argument("--split", help="only slices of this manifest split")
    s.add_argument("--tta", action="store_true", help="average with a horizontally flipped pass")
    _add_precision(s)
    s.add_argument("--network-classes", action="store_true", help="score the network's own GGO / consolidation "
                   "split instead of the density rule (consolidation from -346 HU; see covidct.engine.infer)")
    s.add_argument("--json", metavar="OUT", help="write the results as JSON")
    s.add_argument("--overlays", metavar="DIR", help="also draw every slice: its true labels beside the predicted "
                   "ones (GGO red, consolidation blue, effusion green, lung outline yellow), DIR/<id>.png")
    s.set_defaults(func=_cmd_evaluate_seg)

    s = evaluate.add_parser("cls", help="classifier on a classification folder")
    s.add_argument("--model", action="append", help="shipped model name or .pt file; repeat it to evaluate the "
                   "mean of several models (an ensemble)")
    s.add_argument("--tta", action="store_true", help="average with the left-right mirrored images")
    s.add_argument("--data", required=True)
    s.add_argument("--split", help="only records of this split (split.csv layouts)")
    s.add_argument("--json", metavar="OUT")
    s.add_argument("--plot", metavar="PNG", help="confusion-matrix picture")
    s.add_argument("--slice-context", choices=("scan", "slice"), default="scan",
                   help="CT triage models only: which pneumonia a slice's lesions are is decided by its scan (the "
                   "mean over the scan's 5 largest-lesion slices, as analyze reports; default) or by the slice alone")
    _add_precision(s, "lesion segmentation of a triage model (classifiers always run in float32)")
    s.set_defaults(func=_cmd_evaluate_cls)

    s = evaluate.add_parser("lesions", help="Mask R-CNN lesion AP on a COVID-SemiSeg-layout folder")
    s.add_argument("--model", help="shipped name or .pt file")
    s.add_argument("--data", required=True)
    s.add_argument("--split")
    s.add_argument("--json", metavar="OUT")
    s.add_argument("--overlays", metavar="DIR", help="also draw every slice: its true instances beside the "
                   "predicted ones scoring >= 0.3 (masks, boxes with scores; GGO red, consolidation blue), DIR/<id>.png")
    _add_precision(s, "lesion Mask R-CNN")
    s.set_defaults(func=_cmd_evaluate_lesions)

    s = evaluate.add_parser("cam", help="weakly-supervised infection masks from class activation maps")
    s.add_argument("--model", help="CNN classifier or ensemble (its CNN members' mean map): shipped name or .pt file; "
                   "default cls-cv5-ucsd-tta")
    s.add_argument("--data", required=True, help="folder in the COVID-SemiSeg layout")
    s.add_argument("--threshold", type=float, default=0.5, help="relative CAM threshold")
    s.add_argument("--method", choices=("gradcam", "gradcam++", "layercam"), default="gradcam")
    s.add_argument("--density", action="store_true", help="keep only mask pixels denser than aerated lung (> -700 HU "
                   "through the model window); with --threshold 0 this label-free prior alone is scored")
    s.add_argument("--json", metavar="OUT")
    s.set_defaults(func=_cmd_evaluate_cam)

    s = sub.add_parser("explain", help="class activation map of a classifier over an image")
    s.add_argument("image")
    s.add_argument("-o", "--output", required=True, help="PNG to write")
    s.add_argument("--model", help="CNN classifier or ensemble (heat map; an ensemble's is the mean of its CNN members' "
                   "maps) or Mask-Net classifier (the RoIs it reads): shipped name or .pt file; default cls-cv5-ucsd-tta")
    s.add_argument("--class", dest="target", help="class to explain (default: the positive / last class)")
    s.add_argument("--method", choices=("gradcam", "gradcam++", "layercam"), default="gradcam")
    s.add_argument("--slice", type=int, help="slice of a volume (default: the middle one)")
    s.set_defaults(func=_cmd_explain)

    s = sub.add_parser("analyze", help="scan-level analysis: lungs, lesions, burden, severity, report")
    s.add_argument("path", nargs="+", help="DICOM series folder or file, NIfTI volume, .zip of these, image, or folder of images; "
                   "several: each into OUTDIR/<name>/ with OUTDIR/summary.csv and summary.json")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.set_defaults(output_kind="folder")
    s.add_argument("--model", help="segmentation model: shipped name or .pt file")
    s.add_argument("--device", default="cpu")
    _add_precision(s)
    s.add_argument("--series", help="SeriesInstanceUID when a folder holds several series (default: the largest axial one, "
                   "and the report says so); 'all': analyse each series into OUTDIR/<folder>-s1, -s2, ...")
    s.add_argument("--window", default="model", help="HU window into the model: 'model' (L-420/W1480, matched to "
                   "the training slices), 'lung', or --window=LEVEL,WIDTH; the GGO / consolidation density split "
                   "(0.55 of the model input) means -346 HU only under the model window")
    s.add_argument("--classifier", help="slice classifier whose class probabilities are reported for the slices "
                   "with lesions (shipped name or .pt file), or 'none'; default: cls-effl0-seginit when the triage "
                   "does not run (no pixel spacing, or --triage none), else none (the triage gives every slice "
                   "3-class probabilities)")
    s.add_argument("--triage", help="3-class patient answer (Control / Common pneumonia / "
                   "COVID-19) for volumes with a pixel spacing: shipped triage model or .pt file; 'none' for the "
                   "lesion-only answer (default: triage-ct)")
    s.add_argument("--no-viewer", action="store_true", help="do not write viewer.html (every slice with its overlay)")
    s.add_argument("--dicom-seg", action="store_true", help="DICOM series or multi-frame inputs: also write lesions.seg.dcm and "
                   "lungs.seg.dcm, DICOM Segmentations of the lesions and of the lungs on the source images (one SEG "
                   "series, for PACS / OHIF / 3D Slicer)")
    s.add_argument("--slice-orientation", choices=("training", "working"), default="training",
                   help="DICOM / NIfTI slices into the segmentation model: 'training' turns each a quarter into the "
                   "orientation of the training slices (anterior at the left) and the labels back; 'working': as "
                   "read, anterior up")
    s.add_argument("--reorient", choices=("none", "anatomy"), default="none",
                   help="HU volumes: 'anatomy' turns back the axes the orientation check calls reversed (spine, "
                   "mediastinum, liver) before the analysis; label maps stay on the file's grid (default: none, "
                   "the check only reports)")
    s.add_argument("--denoise", choices=("auto", "none"), default="auto",
                   help="HU volumes: 'auto' smooths the slices the models see of a scan much noisier than those "
                   "they were checked on (soft-tissue noise index above 50 HU, e.g. a sharp lung kernel; brought to "
                   "20 HU by a Gaussian of at most 1.5 mm; lungs, viewer and overlays use the slices as read); 'none' "
                   "only measures (input.noise of report.json)")
    s.add_argument("--json", action="store_true", help="print report.json to stdout")
    s.set_defaults(func=_cmd_analyze)

    s = sub.add_parser("compare", help="a follow-up scan against an earlier one: every burden measure before, "
                       "after and its change (two covidct analyze outputs)")
    s.add_argument("before", help="analyze output folder (or its report.json) of the earlier scan")
    s.add_argument("after", help="analyze output folder (or its report.json) of the later scan")
    s.add_argument("--json", metavar="OUT", help="write the comparison as JSON")
    s.set_defaults(func=_cmd_compare)

    s = sub.add_parser("serve", help="show analysis outputs in a browser (viewer, report, index of scans)")
    s.add_argument("folder", help="a covidct analyze output folder, or a folder of several")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("classify", help="class probabilities of slices (images, DICOM, NIfTI) with a slice classifier")
    s.add_argument("paths", nargs="+")
    s.add_argument("--model", help="classifier, Mask-Net classifier, ensemble or CT triage model (3 classes; CT "
                   "with a pixel spacing): shipped name or .pt file (default: the shipped default classifier)")
    s.add_argument("--json", help="also write the result to this JSON file")
    _add_precision(s, "lesion segmentation of a triage model (classifiers always run in float32)")
    s.set_defaults(func=_cmd_classify)

    pretrain = sub.add_parser("pretrain", help="self-supervised pretraining").add_subparsers(dest="task", required=True)
    s = pretrain.add_parser("seg", help="the segmentation network learns to restore corrupted unlabelled slices "
                            "(Models Genesis), for train seg --init")
    s.add_argument("--data", required=True, action="append", help="folder of unlabelled slices: any classification "
                   "layout (labels ignored) or a folder of images (repeatable)")
    s.add_argument("--split", default="train", help="only this split when the folder has splits ('' for all)")
    s.add_argument("--encoder", default="efficientnet-lite0")
    s.add_argument("--decoder-channels", default="96,48,24,16,8")
    s.add_argument("--random-init", action="store_true", help="no ImageNet weights for the encoder")
    s.add_argument("--input-size", type=int, default=320)
    s.add_argument("--epochs", type=int, default=15)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("-o", "--output", required=True, help="pretrained network file to write (.pt)")
    s.set_defaults(func=_cmd_pretrain_seg)

    s = sub.add_parser("pseudolabel", help="label unlabelled slices with a segmentation model (a folder for "
                       "`train seg --data`: self-training)")
    s.add_argument("--data", required=True, help="classification folder (split.csv, COVID-CT-MD, COVIDx-CT names, "
                   "folder per class) or a folder of images")
    s.add_argument("--split", default="train", help="which split of a folder with splits ('' for all; default train)")
    s.add_argument("--model", help="the teacher: shipped segmentation model name or .pt file")
    s.add_argument("--min-lung-fraction", type=float, help="skip slices whose lungs cover less of the lung-box "
                   "crop (default 0.15)")
    s.add_argument("-o", "--output", required=True, help="new folder (COVID-SemiSeg layout)")
    s.set_defaults(output_kind="folder")
    s.set_defaults(func=_cmd_pseudolabel)

    s = sub.add_parser("predict", help="segment slices: label maps, lung masks, overlays")
    s.add_argument("paths", nargs="+")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.set_defaults(output_kind="folder")
    s.add_argument("--model", help="shipped model name or .pt file")
    s.add_argument("--lesion-model", help="also run a Mask R-CNN lesion model (shipped name or .pt file): "
                   "<name>_instances.png with masks, boxes and scores, and `instances` in predictions.json")
    s.add_argument("--lesion-score", type=float, default=0.3, help="minimum score of the instances drawn and listed")
    _add_precision(s, "segmentation network and the lesion Mask R-CNN")
    s.set_defaults(func=_cmd_predict)
    return p


#: Numeric options shared by the training commands and the least each may be (None: not given).
_AT_LEAST: dict[str, float] = {"epochs": 1, "batch_size": 1, "input_size": 32, "top_n": 1, "s_width": 1,
                               "threads": 0, "swa_epochs": 0, "warmup_epochs": 0, "folds": 0,
                               "box_head_dim": 1, "rpn_pre_nms_top_n_train": 1, "rpn_post_nms_top_n_train": 1,
                               "rpn_batch_size_per_image": 1, "box_batch_size_per_image": 1}


def check_numeric_options(args: argparse.Namespace) -> None:
    """One error line for a numeric option out of range (an epoch count of 0, a 7-pixel input,
    a negative learning rate), before any data are read or any file is written."""
    for name, least in _AT_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise CovidctError(None, f"--{name.replace('_', '-')} must be at least {least:g}, got {value:g}")
    lr = getattr(args, "lr", None)
    if lr is not None and not lr > 0:
        raise CovidctError(None, f"--lr must be positive, got {lr:g}")
    if getattr(args, "folds", 0) == 1:
        raise CovidctError(None, "--folds must be 0 (no folds) or at least 2, got 1")


def check_output_options(args: argparse.Namespace) -> None:
    """One error line, before any work, when an output path cannot be written as asked: ``-o`` naming a file
    where a folder is written (``analyze``, ``predict``, ``pseudolabel``) or a folder where a file is, a file
    standing where a folder of the path should be, ``--json`` / ``--plot`` naming a folder, ``--overlays`` a
    file."""
    outputs = [("-o", getattr(args, "output", None), getattr(args, "output_kind", "file")),
               ("--overlays", getattr(args, "overlays", None), "folder")]
    outputs += [(f"--{name}", getattr(args, name, None), "file") for name in ("json", "plot")]
    for option, value, kind in outputs:
        if not isinstance(value, str):   # absent, or a flag (analyze --json)
            continue
        path = Path(value)
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                raise CovidctError(parent, f"is a file, so {option} {value} cannot be written below it")
        if kind == "folder" and path.exists() and not path.is_dir():
            raise CovidctError(path, f"{option} names an existing file; give a folder")
        if kind == "file" and path.is_dir():
            raise CovidctError(path, f"{option} names a folder; give a file name")


#: Commands that run networks: PyTorch is imported for them at once and, without a GPU, its GPU libraries'
#: pages are dropped from memory (``analyze`` does it itself, after it has started reading the scan).
MODEL_COMMANDS = {_cmd_train_seg, _cmd_train_cls, _cmd_train_lesions, _cmd_train_maskcls, _cmd_train_triage,
                  _cmd_ensemble, _cmd_evaluate_seg, _cmd_evaluate_cls, _cmd_evaluate_lesions, _cmd_evaluate_cam,
                  _cmd_explain, _cmd_classify, _cmd_pretrain_seg, _cmd_pseudolabel, _cmd_predict}


def _drop_unused_gpu_libraries() -> None:
    """PyTorch (and torchvision, which the models import) loaded now, then their GPU libraries' resident pages
    dropped when no GPU is usable (:func:`covidct.runtime.drop_unused_gpu_libraries`: ~0.27 GB less memory)."""
    import torch  # noqa: F401  (each model command imports both anyway)
    import torchvision  # noqa: F401

    drop_unused_gpu_libraries()


def _precision_note(args: argparse.Namespace) -> None:
    """``--precision bf16`` asked for on a device without native bfloat16: one note that it runs emulated."""
    if getattr(args, "precision", None) != "bf16":
        return
    from covidct.engine.precision import native_bf16

    import torch

    device = getattr(args, "device", "cpu")
    if torch.device(device).type == "cpu" and not native_bf16(device):
        print("note: --precision bf16: this processor has no native bfloat16 (AVX512-BF16 or AMX), so it is emulated "
              "and slower than fp32 ('auto' would choose fp32 here)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        check_numeric_options(args)
        check_output_options(args)
        if args.func in MODEL_COMMANDS:
            _drop_unused_gpu_libraries()
            _precision_note(args)
        return int(args.func(args) or 0)
    except CovidctError as exc:
        if args.debug:
            raise
        print(f"covidct: error: {' '.join(str(exc).split())}", file=sys.stderr)   # one line, whatever the reason
        return 2
    except KeyboardInterrupt:
        print("covidct: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        if args.debug:
            raise
        reason = " ".join(str(exc).split())   # one line, also for multi-line messages
        print(f"covidct: error: {type(exc).__name__}: {reason} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
