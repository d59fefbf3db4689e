"""Write the synthetic vision-language set as webdataset shards.

    python -m data_prep.synthetic --out DIR --samples 50000 --seed 1234 --image-size 224 --shard-size 1000 --workers 2
    python -m data_prep.synthetic --out DIR_EVAL --samples 2000 --seed 1234 --split heldout

The trainer builds the same set into its cache on first use; this command is for building it ahead
of time or at another size (point ``dataset.path`` at DIR). ``--split heldout`` is the evaluation
split: the same generator at seed + 1, so no sample (or key) is shared with the training split.
"""

import argparse
from functools import partial

from data_prep import common
from nemo_pixellm.data.synthetic import HELDOUT_SEED_OFFSET, scene_record


def convert(index: int, seed: int, image_size: int, quality: int) -> dict:
    return scene_record(seed, index, image_size, quality)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    seed = args.seed + (HELDOUT_SEED_OFFSET if args.split == "heldout" else 0)
    items = [(f"index {i}", i) for i in range(args.samples)]
    job = common.Job(tool="synthetic", items=items,
                     convert=partial(convert, seed=seed, image_size=args.image_size, quality=args.quality),
                     settings={"seed": seed, "split": args.split, "image_size": args.image_size,
                               "quality": args.quality})
    return common.run(job, args)


if __name__ == "__main__":
    main()
