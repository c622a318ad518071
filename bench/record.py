"""What a result was measured on, and keeping a printed report as a results file.

Every figure the README quotes names the file under bench/results/ it comes from, and every
file names the command, the commit and the machine that produced it. `run.py` and `soak.py`
write their own reports; the tools that only print (`ablate.py`, `compare.py`, `disk.py`) keep
what they printed with `--save NAME`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict[str, Any]:
    """The machine and the tree a measurement is taken on (a tree with uncommitted changes in
    the package says so)."""
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH.parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "clawrouter"],
                                    cwd=BENCH.parent, capture_output=True, text=True,
                                    timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.now(timezone.utc)
            .strftime("%Y-%m-%d %H:%M UTC"), "loadavg_before": loadavg(),
            "git_commit": commit + ("+local changes" if dirty else "")}


def command_line(script: str, argv: list[str]) -> str:
    return " ".join([".venv/bin/python", f"bench/{script}", *map(shlex.quote, argv)])


def produced_by(command: str, m: dict[str, Any]) -> str:
    """The line that heads a results file."""
    return (f"Produced by `{command}` on {m['date']} — {m['nproc']} cores ({m['cpu']}), "
            f"Python {m['python']}, clawrouter {m.get('git_commit') or '?'}, load average "
            f"{m['loadavg_before']} before the run.")


class _Tee(io.TextIOBase):
    def __init__(self, out: TextIO) -> None:
        self.out, self.kept = out, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def saved(name: str | None, title: str, script: str, fenced: bool = True) -> Iterator[None]:
    """Print as usual; with a `name`, also keep what was printed in bench/results/<name>.md
    under `title` (`fenced`: as a code block, for fixed-width tables), headed by the command
    (this process's arguments), the commit and the machine, all taken when the run starts.
    Nothing is written if the run fails."""
    if not name:
        yield
        return
    heading = produced_by(command_line(script, sys.argv[1:]), machine())
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    body = tee.kept.getvalue().rstrip()
    path.write_text(f"## {title}\n\n{heading}\n\n"
                    + (f"```\n{body}\n```\n" if fenced else f"{body}\n"))
    print(f"saved {path.relative_to(BENCH.parent)}")


def _stem(name: str) -> str:
    if not name or Path(name).name != name or name.startswith("."):
        raise argparse.ArgumentTypeError(f"{name!r}: a file name, without a directory")
    return name


def add_save_option(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--save", metavar="NAME", type=_stem,
                        help=f"also keep the report in bench/results/NAME.md (e.g. {example})")
