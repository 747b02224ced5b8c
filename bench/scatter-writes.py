#!/usr/bin/env python3
"""Overwrite a fraction of a disk image with scattered 64 KiB writes of random data, the way a
running guest dirties its disk, and print the changed ranges (one `OFFSET LENGTH` per line,
the format of `cairn backup image --changed-ranges`).

    bench/scatter-writes.py IMAGE PERCENT SEED > changed.txt
"""
import os
import random
import sys

BLOCK = 65536


def main():
    path, percent, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    size = os.path.getsize(path)
    blocks = size // BLOCK
    count = max(1, int(blocks * percent / 100))
    offsets = sorted(rng.sample(range(blocks), count))
    with open(path, "r+b") as f:
        for b in offsets:
            f.seek(b * BLOCK)
            f.write(rng.randbytes(BLOCK))
        f.flush()
        os.fsync(f.fileno())
    for b in offsets:
        print(b * BLOCK, BLOCK)
    print(f"wrote {count} blocks of 64 KiB ({count * BLOCK} bytes, {percent}% of {size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
