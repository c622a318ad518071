"""What durability costs on this machine, in CPU: the floor under any gateway that stores images.

    .venv/bin/python bench/disk.py [--dir DIR] [--count 200]

For image sizes the benchmarks use, measures the CPU (user + kernel) this process spends per
image to: hash it (sha256, the store's content id); write it to a new file and rename it into
place, as the store does, without fsync; and the same with fsync (the store's durable write).
The kernel's share is the copy into the page cache and the filesystem's bookkeeping; fsync adds
the journal commit. It measures in a temporary directory made in `--dir` (default: the home
directory, where `CLAWROUTER_HOME` lives unless you moved it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import record

SIZES = {"200 KB (URL result)": 200_000, "1.1 MB (1.5 MB data URI)": 1_100_000}


def _write(directory: Path, data: bytes, sync: bool) -> None:
    final = directory / secrets.token_hex(16)
    tmp = final.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)


def cpu_ms_per_call(fn: Callable[[], object], count: int) -> float:
    """CPU (user + kernel) this process spends per call of `fn`, after one warm-up call."""
    fn()  # warm
    start = time.process_time()  # user + kernel, ns resolution
    for _ in range(count):
        fn()
    return (time.process_time() - start) * 1000 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path.home(),
                        help="a directory on the disk to measure (a temporary one is made in it)")
    parser.add_argument("--count", type=int, default=200, help="images per measurement")
    record.add_save_option(parser, "disk")
    args = parser.parse_args()
    with record.saved(args.save, "What durability costs here, in CPU", "disk.py", fenced=False):
        measure(args.dir, args.count)


def measure(where: Path, count: int) -> None:
    print(f"CPU per image, ms (user + kernel), {count} images each, on {where}\n")
    print("| image | sha256 | write + rename | write + fsync + rename (durable) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=where, prefix="clawrouter-disk-") as tmp:
        directory = Path(tmp)
        for label, size in SIZES.items():
            data = secrets.token_bytes(size)
            row = [cpu_ms_per_call(lambda: hashlib.sha256(data).digest(), count * 5),
                   cpu_ms_per_call(lambda: _write(directory, data, sync=False), count),
                   cpu_ms_per_call(lambda: _write(directory, data, sync=True), count)]
            for f in directory.iterdir():
                f.unlink()
            print(f"| {label} | " + " | ".join(f"{ms:.3f}" for ms in row) + " |")


if __name__ == "__main__":
    main()
