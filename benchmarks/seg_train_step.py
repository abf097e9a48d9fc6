"""Seconds per training step of the segmentation U-Net in float32 and under bfloat16 autocast, on this CPU.

    python benchmarks/seg_train_step.py [--batch-size 8] [--input-size 320] [--steps 4] [--repeat 2] [--threads 2]

The network and loss of ``covidct train seg --labels masks4`` with its defaults (EfficientNet-Lite0 U-Net, lung head,
cross-entropy + soft Dice, AdamW, channels-last) on one random batch: one warm-up step, then ``--steps`` timed steps,
for each precision in turn, ``--repeat`` rounds (alternating, so that a drift of the machine's speed hits both).
``bf16`` wraps the forward pass in ``torch.autocast("cpu", dtype=torch.bfloat16)``; the loss is computed in float32.
Without native bfloat16 (no AVX512-BF16 / AMX) it still runs, and says that bfloat16 is emulated here.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PRECISIONS = ("fp32", "bf16")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--input-size", type=int, default=320)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if min(args.batch_size, args.steps, args.repeat, args.threads) < 1 or args.input_size < 32:
        ap.error("--batch-size, --steps, --repeat, --threads must be at least 1 and --input-size at least 32")

    import torch

    from covidct.engine.precision import native_bf16
    from covidct.engine.train_seg import SegTrainConfig, seg_loss
    from covidct.models.segmentation import build_seg_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SegTrainConfig(data=[], labels="masks4", input_size=args.input_size)
    mcfg = cfg.model_config()
    model = build_seg_model(mcfg, imagenet=False).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    n, s = args.batch_size, args.input_size
    x = torch.rand(n, 1, s, s).to(memory_format=torch.channels_last)
    labels = torch.randint(0, len(mcfg.lesion_classes), (n, s, s))
    lung = torch.randint(0, 2, (n, s, s)).float()
    infection = ([i for i, c in enumerate(mcfg.lesion_classes) if c in ("ggo", "consolidation")],
                 cfg.infection_dice_weight)

    def step(precision: str) -> None:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss = seg_loss(logits.float(), labels, lung, len(mcfg.lesion_classes), mcfg.lung_head, cfg.lung_weight,
                        None, infection, cfg.loss)
        loss.backward()
        opt.step()

    if not native_bf16("cpu"):
        print("note: this processor has no native bfloat16 (AVX512-BF16 or AMX): bf16 is emulated here")
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(args.repeat):
        for precision in PRECISIONS:
            step(precision)   # warm-up
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(precision)
            times[precision].append((time.perf_counter() - t0) / args.steps)
    print(f"training step, batch {n} x {s}², {args.threads} threads, {args.steps} steps per round:")
    for precision in PRECISIONS:
        print(f"  {precision}: " + " / ".join(f"{t:.3f}" for t in times[precision]) + " s per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
