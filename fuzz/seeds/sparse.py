#!/usr/bin/env python3
"""Writes a raw disk image as an input of the guest-bytes fuzz targets (the format of
fuzz_targets/guest_disk/mod.rs): the disk's size (u64 LE), then its non-zero stretches as
chunks of offset (u64 LE), length (u16 LE) and bytes. A large, mostly empty image becomes a
small input.

    sparse.py [--blank-ff] IMAGE OUTPUT [SIZE]
        SIZE: the disk size to claim (default: the image's)
        --blank-ff: sectors that are all 0xFF count as empty (NTFS fills its $LogFile so;
        cairn never reads it, and it would make the input megabytes)
"""
import struct
import sys

GRANULE = 512
MAX_CHUNK = (65535 // GRANULE) * GRANULE


def encode(raw, size, blank_ff=False):
    if blank_ff:
        raw = bytearray(raw)
        for at in range(0, len(raw), GRANULE):
            if raw[at:at + GRANULE] == b"\xff" * GRANULE:
                raw[at:at + GRANULE] = bytes(GRANULE)
    out = bytearray(struct.pack("<Q", size))
    at, n = 0, len(raw)
    while at < n:
        if not any(raw[at:at + GRANULE]):
            at += GRANULE
            continue
        start = at
        while at < n and at - start < MAX_CHUNK and any(raw[at:at + GRANULE]):
            at += GRANULE
        end = min(at, n)
        out += struct.pack("<QH", start, end - start) + raw[start:end]
    return bytes(out)


if __name__ == "__main__":
    args = sys.argv[1:]
    blank_ff = "--blank-ff" in args
    args = [a for a in args if a != "--blank-ff"]
    image, output = args[0], args[1]
    raw = open(image, "rb").read()
    size = int(args[2]) if len(args) > 2 else len(raw)
    open(output, "wb").write(encode(raw, size, blank_ff))
