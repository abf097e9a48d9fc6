"""Write a model card (Markdown) beside a shipped checkpoint from the checkpoint's own metadata.

    python scripts/model_card.py src/covidct/weights/NAME.pt --command "covidct train ..." --data-terms "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from covidct import DISCLAIMER
from covidct.models.checkpoint import file_sha256, read_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--command", required=True, help="the exact command that produced it")
    ap.add_argument("--data-terms", required=True)
    ap.add_argument("--notes", default="")
    args = ap.parse_args()
    path = Path(args.checkpoint)
    p = read_checkpoint(path)
    m = p.get("metrics", {})
    lines = [
        f"# {path.stem}", "", f"> {DISCLAIMER}", "",
        f"* task: `{p['task']}`; classes: {', '.join(p.get('classes', []))}; input size: {p.get('input_size')}",
        f"* file: `{path.name}`, {path.stat().st_size / 1e6:.1f} MB (fp16), sha256 `{file_sha256(path)}`",
        f"* created: {p.get('created')}; versions: {json.dumps(p.get('versions', {}))}",
        f"* normalisation: {p.get('normalization', 'n/a')}",
        f"* training time up to the kept epoch {m.get('epoch', 'n/a')}: {m.get('train_seconds', 'n/a')} s on this 2-core CPU",
        "", "## Reproduce", "", "```bash", args.command, "```", "",
        "## Data and terms", "", args.data_terms, "",
        ("## Metrics (in-sample: fitted and scored on the same data; no estimate for unseen data)" if "in_sample" in m
         else "## Metrics (validation split or cross-validation, carved out of the training data)"), "", "```json",
        json.dumps({k: v for k, v in m.items() if k != "val_ids"}, indent=2), "```", "",
        "## Architecture (rebuilt from this checkpoint alone)", "", "```json", json.dumps(p["config"], indent=2), "```",
    ]
    for role, c in (p.get("companions") or {}).items():
        cm = c.get("metrics", {})
        use = {"effusion": "run beside the main network on the same input (`covidct attach`; it alone decides "
                           "effusion)",
               "lung_masked": "run instead of the main network, on the lung box the main network found, for slices black outside their lungs "
                              "(`covidct attach --lung-masked`; `SegPrediction.network`)"}.get(role, "run by the predictor")
        lines += ["", f"## Companion network: {role}", "",
                  f"Stored inside this file and {use}. Classes: {', '.join(c.get('classes', []))}; "
                  f"input size: {c.get('input_size')}; training time up to its kept epoch {cm.get('epoch', 'n/a')}: "
                  f"{cm.get('train_seconds', 'n/a')} s.", "", "```json",
                  json.dumps({"config": c["config"], "metrics": {k: v for k, v in cm.items() if k != "val_ids"}},
                             indent=2), "```"]
    if args.notes:
        lines += ["", "## Notes", "", args.notes]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
