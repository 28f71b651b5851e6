"""`pixeldit evaluate SAMPLES.npz --ref REF.npz`: the ADM suite's metrics (evaluation/evaluate.py), printed and
optionally written as JSON."""

from __future__ import annotations

import json

from ..evaluation.evaluate import evaluate_npz


def _format(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_evaluate_command(args) -> int:
    result = evaluate_npz(args.samples, args.ref, args.inception, args.batch_size, args.device, args.frechet)
    h, w = result["image_size"]
    pr_note = "" if result["precision"] is not None else "  (needs more than 3 reference images)"
    print(f"samples          {result['samples']}: {result['num_samples']} images {h}x{w}")
    print(f"reference        {result['reference']}: {result['num_reference_images']} images; "
          f"FID statistics: {result['fid_reference']}, sFID statistics: {result['sfid_reference']}")
    print(f"Inception Score  {_format(result['inception_score'], 3)}  (splits: {result['inception_score_splits']})")
    print(f"FID              {_format(result['fid'], 4)}")
    print(f"sFID             {_format(result['sfid'], 4)}")
    print(f"Precision        {_format(result['precision'], 4)}{pr_note}")
    print(f"Recall           {_format(result['recall'], 4)}{pr_note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0
