"""Write the synthetic vision-language set as webdataset shards.

    python -m data_prep.synthetic --out DIR --samples 50000 --seed 1234 --image-size 224 --shard-size 1000

The trainer builds the same set into its cache on first use; this command is for building it ahead
of time or at another size (point ``dataset.path`` at DIR).
"""

import argparse
import json
import time

from nemo_pixellm.data.shards import write_shards
from nemo_pixellm.data.synthetic import scene_record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    start = time.time()
    manifest = write_shards((scene_record(args.seed, i, args.image_size) for i in range(args.samples)),
                            args.out, args.shard_size)
    seconds = time.time() - start
    print(json.dumps({"samples": manifest["samples"], "shards": len(manifest["shards"]), "seconds": round(seconds, 2),
                      "images_per_s": round(manifest["samples"] / seconds, 1), "sha256": manifest["sha256"]}))


if __name__ == "__main__":
    main()
