"""Throughput of the synthetic generator: samples (render + JPEG encode) per second with 1 and 2 processes.

    .venv/bin/python benchmarks/synthetic_throughput.py [--samples 4000] [--size 224] [--workers 1 2]

Shard writing is left out; ``python -m data_prep.synthetic`` prints the end-to-end rate.
"""

import argparse
import multiprocessing
import resource
import time

from nemo_pixellm.data.synthetic import scene_record

CHUNK = 250


def render_chunk(task) -> int:
    seed, start, stop, size = task
    return sum(len(scene_record(seed, i, size)["jpg"]) for i in range(start, stop))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the rate other load on the machine cannot lower)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(samples: int, size: int, workers: int) -> tuple[float, float, float]:
    """(samples per second, samples per CPU second, mean JPEG bytes), process start-up included."""
    tasks = [(1234, start, min(start + CHUNK, samples), size) for start in range(0, samples, CHUNK)]
    begin, begin_cpu = time.perf_counter(), cpu_seconds()
    if workers == 1:
        total_bytes = sum(map(render_chunk, tasks))
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            total_bytes = sum(pool.imap_unordered(render_chunk, tasks))
    wall, cpu = time.perf_counter() - begin, cpu_seconds() - begin_cpu
    return samples / wall, samples / cpu, total_bytes / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    for workers in args.workers:
        rate, per_cpu_second, jpeg_bytes = measure(args.samples, args.size, workers)
        print(f"{args.size}px, {workers} worker{'s' if workers > 1 else ''}: {rate:,.0f} images/s "
              f"({per_cpu_second:,.0f} per CPU second, {jpeg_bytes / 1024:.1f} KiB per JPEG)")


if __name__ == "__main__":
    main()
