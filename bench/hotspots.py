"""Where a profiled gateway spends its CPU: a summary of py-spy's folded stacks.

    .venv/bin/python bench/hotspots.py bench/results/profile/edit-4mb-gateway.folded [top]

Self time = samples whose innermost frame is that function; inclusive = samples with the
function anywhere on the stack (counted once per sample). Samples whose innermost frame is a wait
(the event loop in select/epoll, an idle thread-pool worker) are left out of the percentages.
py-spy samples threads that are not idle, so a thread blocked in fsync (SQLite commit, atomic
file write) counts as busy: read those entries as wall time on the request path, not CPU.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_IDLE = re.compile(r"^(\w+\.)?(select|poll|epoll_wait|_run_once|run_forever|wait|_worker) ")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/clawrouter/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/clawrouter/":
                path = "clawrouter/" + path
            break
    return f"{m.group('func')} ({path})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append(([_name(f) for f in stack.split(";")], int(count)))
    return stacks


def summary(path: Path, top: int = 15) -> str:
    stacks = load(path)
    busy = [(frames, n) for frames, n in stacks if not (frames and _IDLE.search(frames[-1]))]
    total = sum(n for _, n in busy) or 1
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, n in busy:
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"  {total} busy samples; self time:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  inclusive, clawrouter frames:")
    ours = [(f, n) for f, n in incl.most_common() if "clawrouter/" in f]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in ours[:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folded", type=Path, help="a py-spy folded-stacks file")
    parser.add_argument("top", type=int, nargs="?", default=15, help="functions to list")
    args = parser.parse_args()
    print(summary(args.folded, args.top))
