"""Mask R-CNN speed, side by side in one run: torchvision's default ``maskrcnn_resnet50_fpn``
(random weights, 800-1333 resize as shipped, and at 512) against covidct's lesion model, on 512x512
slices (random ones, or the first ``--n`` slices of ``--data`` resized to 512), inference mode, 2 threads;
with ``--model`` and ``--data`` also the AP of that trained lesion model on the folder; with
``--train-steps K`` also the seconds per training step (AdamW, ``--train-batch`` slices with their lesion
instances) of torchvision's R50-FPN at 512 against covidct's training configuration and against it with
each cheapening undone alone (1024-d box head, torchvision's proposal and sample counts, 512 px input).

    python benchmarks/masknet.py [--model NAME|FILE] [--data ../shared/data/covid-semiseg [--ids 0,1,15]] [--n 8]
        [--detections 50 --detections 25] [--proposals 100 --proposals 50] [--input-size 320 --input-size 256]
        [--train-steps 3 [--train-batch 4]]

Each ``--detections`` / ``--proposals`` / ``--input-size`` value is one inference setting of covidct's model,
changed alone from the model's own, timed and (with ``--model`` and ``--data``) scored.

``--precision auto|fp32|bf16`` (default auto, as covidct's commands): every timed and scored model runs in it
(torchvision's references under the same autocast as covidct's ``predict_instances``); training steps are float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch


def timed(fn, images, repeats: int, precision: str = "fp32") -> float:
    from covidct.engine.precision import autocast

    with torch.inference_mode(), autocast(precision):
        fn(images[:1])
        t0 = time.perf_counter()
        for _ in range(repeats):
            for im in images:
                fn([im])
    return (time.perf_counter() - t0) / (repeats * len(images))


def train_step_seconds(model, images: list[torch.Tensor], targets: list[dict], steps: int) -> float:
    """Seconds per optimizer step (forward with targets, summed losses, backward, AdamW) after one warm-up step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sum(model(images, targets).values()).backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


TORCHVISION_SAMPLING = {"rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 2000,
                        "rpn_batch_size_per_image": 256, "box_batch_size_per_image": 512}


def training_rows(config, grey: list[torch.Tensor], labels: list[torch.Tensor], steps: int, batch: int) -> list[tuple]:
    """(name, params, s/step) of torchvision's R50-FPN at 512 and covidct's training configuration ``config``
    with each cheapening undone alone; every model gets the same slices and lesion instances at its input size."""
    import torch.nn.functional as F
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from covidct.models.lesions import LesionModelConfig, build_lesion_model, instances_from_labels

    def batch_at(size: int, channels: int):
        ims, tgs = [], []
        for i in range(batch):
            g, lab = grey[i % len(grey)], labels[i % len(labels)]
            ims.append(F.interpolate(g[None], size=(size, size), mode="bilinear", align_corners=False)[0].expand(channels, -1, -1))
            lab = F.interpolate(lab[None, None].float(), size=(size, size), mode="nearest")[0, 0].to(torch.uint8).numpy()
            target = instances_from_labels(lab, config.mask_mode)
            if channels == 3:  # torchvision's COCO heads: every lesion as class 1
                target["labels"] = torch.ones_like(target["labels"])
            tgs.append(target)
        return ims, tgs

    rows = []
    ref = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=512, max_size=512)
    rows.append(("torchvision maskrcnn_resnet50_fpn at 512", ref, *batch_at(512, 3)))
    changes = [("covidct training configuration", {}), ("  with torchvision's 1024-d box head", {"box_head_dim": 1024}),
               ("  with torchvision's proposal / sample counts", TORCHVISION_SAMPLING),
               ("  with 512 px input", {"input_size": 512})]
    for name, change in changes:
        cfg = LesionModelConfig.from_dict({**config.to_dict(), **change})
        rows.append((f"{name} ({cfg.input_size} px)", build_lesion_model(cfg), *batch_at(cfg.input_size, 1)))
    out = []
    for name, model, ims, tgs in rows:
        if ims[0].shape[0] == 1:   # LesionNet takes grey slices
            ims = [im[:1] for im in ims]
        torch.manual_seed(0)
        out.append((name, sum(p.numel() for p in model.parameters()), train_step_seconds(model, ims, tgs, steps)))
    return out


def main() -> int:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from covidct.engine.lesions import predict_instances
    from covidct.models.lesions import LesionModelConfig, build_lesion_model
    from covidct.runtime import keep_freed_memory

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained lesion model (shipped name or file); default: an untrained default config")
    ap.add_argument("--data", help="COVID-SemiSeg-layout folder to report AP on")
    ap.add_argument("--ids", help="comma-separated slice ids of --data to use (e.g. a model's validation slices "
                    "0,1,15,20,24,37,39,46,53,57); default: all")
    ap.add_argument("--n", type=int, default=6, help="slices per timing")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the timings (and AP) to this file")
    ap.add_argument("--detections", type=int, action="append",
                    help="cap on detections per slice for covidct's model (repeatable; default: the model's own)")
    ap.add_argument("--proposals", type=int, action="append",
                    help="RPN proposals kept after NMS at inference (repeatable): each also timed (and scored) alone, "
                    "the rest of the model as shipped")
    ap.add_argument("--input-size", type=int, action="append",
                    help="size the model resizes slices to at inference (repeatable; the model trained at its own)")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="also time this many training steps per model (after one warm-up step); 0: skip")
    ap.add_argument("--train-batch", type=int, default=4, help="slices per training step (covidct trains with 4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()   # as the covidct command line does
    torch.manual_seed(0)
    if args.data:  # real slices resized to 512x512: a trained model's detection count is the real one
        import torch.nn.functional as F

        from covidct.data.segmentation import SegFolder
        from covidct.errors import CovidctError
        from covidct.io.window import to_model_input

        try:
            folder = SegFolder(args.data, ids=args.ids.split(",") if args.ids else None)
        except CovidctError as exc:
            print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
            return 2
        grey = [F.interpolate(torch.from_numpy(to_model_input(folder[i].image, is_hu=False))[None, None], size=(512, 512),
                              mode="bilinear", align_corners=False)[0] for i in range(min(args.n, len(folder)))]
        labels = [torch.from_numpy(folder[i].labels.astype("uint8")) for i in range(min(args.n, len(folder)))]
    else:
        grey = [torch.rand(1, 512, 512) for _ in range(args.n)]
        labels = []
        for _ in range(args.n):  # a few random square "lesions" per slice
            lab = torch.zeros(512, 512, dtype=torch.uint8)
            for k in range(6):
                y, x, r = (int(v) for v in torch.randint(40, 470, (2,)).tolist() + [int(torch.randint(6, 30, (1,)))])
                lab[y - r:y + r, x - r:x + r] = 1 + k % 2
            labels.append(lab)
    from covidct.engine.precision import resolve_precision

    prec = resolve_precision(args.precision)
    print(f"timing on {len(grey)} {'real' if args.data else 'random'} 512x512 slices, {args.threads} threads, {prec}")
    rgb = [g.expand(3, -1, -1) for g in grey]

    rows = []
    ref = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    rows.append(("torchvision maskrcnn_resnet50_fpn (default 800px)", sum(p.numel() for p in ref.parameters()), timed(ref, rgb, 1, prec)))
    ref512 = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=512, max_size=512).eval()
    rows.append(("torchvision maskrcnn_resnet50_fpn at 512", sum(p.numel() for p in ref512.parameters()), timed(ref512, rgb, 1, prec)))
    if args.model:
        from covidct.models.registry import load_lesion_model

        ours, _ = load_lesion_model(args.model)
    else:
        ours = build_lesion_model(LesionModelConfig()).eval()
    cfg = ours.config
    # one inference setting changed at a time from the model's own: (label, detections, proposals, input size)
    settings = [(f"<= {cap} detections", cap, cfg.rpn_post_nms_top_n_test, cfg.input_size)
                for cap in (args.detections or [cfg.box_detections_per_img])]
    settings += [(f"{n} RPN proposals", cfg.box_detections_per_img, n, cfg.input_size) for n in args.proposals or []]
    settings += [(f"input {size}px", cfg.box_detections_per_img, cfg.rpn_post_nms_top_n_test, size)
                 for size in args.input_size or []]

    def apply(detections: int, proposals: int, size: int) -> None:
        net = ours.net
        net.roi_heads.detections_per_img = detections   # the mask head runs once per kept detection
        net.rpn._post_nms_top_n["testing"] = proposals
        net.rpn._pre_nms_top_n["testing"] = max(cfg.rpn_pre_nms_top_n_test, proposals)
        net.transform.min_size, net.transform.max_size = (size,), size

    for label, *setting in settings:
        apply(*setting)
        rows.append((f"covidct lesions ({cfg.backbone}, {label})", sum(p.numel() for p in ours.parameters()),
                     timed(lambda ims: predict_instances(ours, ims, precision=prec), [g[0].numpy() for g in grey], 2)))
    base = rows[0][2]
    print(f"{'model':<66}{'params (M)':>11}{'s/slice':>10}{'slices/s':>10}{'speed-up':>10}")
    for name, params, sec in rows:
        print(f"{name:<66}{params / 1e6:>11.2f}{sec:>10.3f}{1 / sec:>10.2f}{base / sec:>9.1f}x")
    timings = [{"model": name, "params_m": round(params / 1e6, 2), "seconds_per_slice": round(sec, 4),
                "speedup_vs_default": round(base / sec, 2)} for name, params, sec in rows]
    train_rows = []
    if args.train_steps > 0:
        trows = training_rows(cfg, grey, labels, args.train_steps, args.train_batch)
        print(f"\ntraining, {args.train_batch} slices per step, {args.train_steps} timed steps each (random weights)")
        print(f"{'model':<66}{'params (M)':>11}{'s/step':>10}{'vs R50':>10}")
        for name, params, sec in trows:
            print(f"{name:<66}{params / 1e6:>11.2f}{sec:>10.3f}{trows[0][2] / sec:>9.1f}x")
        train_rows = [{"model": name, "params_m": round(params / 1e6, 2), "seconds_per_step": round(sec, 4),
                       "speedup_vs_r50_512": round(trows[0][2] / sec, 2)} for name, params, sec in trows]
    ap_rows = []
    if args.data and args.model:
        from covidct.engine.lesions import evaluate_instances

        for label, *setting in settings:
            apply(*setting)
            try:
                r = evaluate_instances(ours, folder, progress=False, precision=prec)
            except CovidctError as exc:   # e.g. binary infection masks for a GGO + consolidation model: no AP
                print(f"no AP: {exc}")
                break
            print(f"{label}, on {args.data}: AP50 {r['ap50']}, AP75 {r['ap75']}, mAP {r['map']}, "
                  f"lesion region Dice {r['infection_dice']}; per class {r['per_class']}")
            ap_rows.append({"setting": label, **{k: r[k] for k in ("ap50", "ap75", "map", "infection_dice")}})
    if args.json:
        from covidct.report.json_io import write_json

        write_json({"slices": len(grey), "threads": args.threads, "precision": prec, "timings": timings, "training": train_rows,
                    "ap": ap_rows}, args.json)   # atomic, with the disclaimer
    return 0


if __name__ == "__main__":
    sys.exit(main())
