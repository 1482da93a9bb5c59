"""Train mantle-nuclei-v2: v1 fine-tuned with intensity augmentation, a wider scale range and balanced styles.

Holds out whole acquisition styles of dsb2018_fluo (``mantle_assets.models.styles``), trains on the
other styles and bbbc039_train with ``train_augmented``, checkpointing into ``--work`` (rerun the same
command to resume), then fits Cellpose's size model. Example (from the project root):

    nice -n 15 python benchmarks/train_nuclei_v2.py --data ../shared/data/nuclei_gt --work runs/v2-train \
        --steps 120 --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mantle_assets.models.cellpose_import import import_cellpose
from mantle_assets.models.styles import split_annotated_by_style
from mantle_assets.models.training import (
    Augmentation,
    TrainingParameters,
    load_annotated_set,
    sampling_probabilities,
    sets_by_style,
    train_augmented,
    train_size_model,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="nuclei_gt folder")
    parser.add_argument("--work", type=Path, default=Path("runs/v2-train"))
    parser.add_argument("--name", default="mantle-nuclei-v2")
    parser.add_argument("--init", default="mantle-nuclei-v1", help="model to start from; 'none' for a fresh network")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=DIR",
                        help="a further annotated training set (images/ and masks/), e.g. mnfinder's training images")
    parser.add_argument("--weight", action="append", default=[], metavar="NAME=SHARE",
                        help="share of each batch drawn from a training set; the others share the rest")
    parser.add_argument("--diameter-min-area", type=int, default=0,
                        help="objects under this area (px) do not set an image's scale (e.g. 60 with micronuclei)")
    parser.add_argument("--object-weight-max", type=float, default=1.0,
                        help="weigh objects smaller than their image's median up to this factor in the loss (1 = off)")
    parser.add_argument("--include-held-out", action="store_true",
                        help="train on the held-out styles too (a final model; its held-out scores are then in-sample)")
    parser.add_argument("--steps", type=int, default=120, help="batches of 8 crops in all")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=0.003)
    parser.add_argument("--bbbc039-share", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-seconds", type=float, default=240.0)
    parser.add_argument("--size-model", action="store_true", help="fit Cellpose's size model after the last step")
    defaults = Augmentation()
    parser.add_argument("--scale-range", type=float, default=defaults.scale_range,
                        help="Cellpose's scale_range (crops resized by 1 +- scale_range / 2); train_seg uses 0.5")
    parser.add_argument("--augment-probability", type=float, default=defaults.probability,
                        help="probability of each intensity change per crop; 0 turns them all off")
    parser.add_argument("--max-blur-sigma", type=float, default=defaults.max_blur_sigma, help="0 turns blur off")
    parser.add_argument("--no-renormalise", action="store_true",
                        help="keep the whole image's normalisation instead of renormalising each changed crop")
    args = parser.parse_args()

    dsb = load_annotated_set(args.data / "dsb2018_fluo")
    split = split_annotated_by_style(dsb.images, dsb.masks)
    train_styles, held_out = sets_by_style("dsb2018_fluo", dsb, split)
    if args.include_held_out:
        train_styles, held_out = {**train_styles, **held_out}, {}
    extra = dict(item.split("=", 1) for item in args.extra)
    train_sets = {"bbbc039_train": load_annotated_set(args.data / "bbbc039_train"), **train_styles,
                  **{name: load_annotated_set(directory) for name, directory in extra.items()}}
    params = TrainingParameters(
        learning_rate=args.learning_rate, seed=args.seed, initial_model=None if args.init == "none" else args.init,
        diameter_min_area=args.diameter_min_area, object_weight_max=args.object_weight_max,
        set_weights={"bbbc039_train": args.bbbc039_share,
                     **{name: float(share) for name, share in (item.split("=", 1) for item in args.weight)}},
    )
    augmentation = Augmentation(
        scale_range=args.scale_range, probability=args.augment_probability, max_blur_sigma=args.max_blur_sigma,
        renormalise=not args.no_renormalise,
    )
    print(json.dumps({"train": {k: len(v) for k, v in train_sets.items()},
                      "held_out": {k: len(v) for k, v in held_out.items()},
                      "styles": [split.clusters.describe(k) for k in range(len(split.clusters.centres))],
                      "augmentation": augmentation.to_json()}, indent=1), flush=True)
    result = train_augmented(
        train_sets, args.work, args.name, params, augmentation, n_steps=args.steps, warmup_steps=args.warmup_steps,
        checkpoint_seconds=args.checkpoint_seconds, log=lambda line: print(line, flush=True),
    )
    print(json.dumps({"model": str(result.model_path), "steps": result.steps, "wall_seconds": result.wall_seconds,
                      "hardware": result.hardware, "precision": result.precision}), flush=True)
    if args.size_model:
        import_cellpose()
        from cellpose import models

        images = [im for s in train_sets.values() for im in s.images]
        masks = [m for s in train_sets.values() for m in s.masks]
        probabilities = sampling_probabilities({k: len(v) for k, v in train_sets.items()}, params.set_weights,
                                               balanced=True)
        net = models.CellposeModel(pretrained_model=str(result.model_path)).net
        print("size model", train_size_model(net, result.model_path, images, masks, probabilities, params), flush=True)


if __name__ == "__main__":
    main()
