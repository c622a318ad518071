"""The benchmark report's arithmetic: the README quotes its CPU budget, so it is pinned here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import record  # noqa: E402
import report  # noqa: E402


def _point(gateway_ms: float, sandbox_ms: float, client_ms: float, direct_rps: float,
           gateway_rps: float, floor_ms: float | None = None) -> dict:
    point = {
        "concurrency": 64, "rps_ratio": round(gateway_rps / direct_rps, 3),
        "gateway": {"rps": gateway_rps, "gw_cpu_ms_per_req": gateway_ms,
                    "sandbox_cpu_ms_per_req": sandbox_ms, "client_cpu_ms_per_req": client_ms},
        "direct": {"rps": direct_rps, "gw_cpu_ms_per_req": 0.0,
                   "sandbox_cpu_ms_per_req": sandbox_ms, "client_cpu_ms_per_req": 0.4},
    }
    if floor_ms is not None:
        point["floor"] = {"gw_cpu_ms_per_req": floor_ms}
    return point


def test_budget_is_what_the_cores_leave_at_the_target_rate() -> None:
    # 2 cores, direct 1,000 req/s: at 800 req/s a request may cost 2.5 ms of CPU in all;
    # sandbox 0.9 + client 0.3 leave 1.3 ms to the gateway.
    b = report.cpu_budget(_point(2.0, 0.9, 0.3, 1000.0, 450.0, floor_ms=0.7), cores=2)
    assert b is not None
    assert b["others_ms"] == pytest.approx(1.2)
    assert b["budget_ms"] == pytest.approx(1.3)
    assert b["gateway_ms"] == 2.0 and b["floor_ms"] == 0.7
    # 2,000 ms of CPU per second over 3.2 ms per request: 625 req/s at best, 0.625× direct
    assert b["ceiling"] == pytest.approx(0.625)


def test_ceiling_bounds_what_was_measured() -> None:
    """A rate above the ceiling would mean more CPU than the cores have: the sums are right
    only if every measured ratio stays under its ceiling (checked on the committed runs)."""
    import json

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    checked = 0
    for name in ("latest.json", "preauth-on.json"):
        data = json.loads((results / name).read_text())
        for scenario in ("gen-url", "gen-datauri", "edit-4mb"):
            point = report._point(data, scenario, 64)
            b = point and report.cpu_budget(point, data["machine"]["nproc"])
            if b:
                assert point["rps_ratio"] <= b["ceiling"] * 1.02, (name, scenario, b)
                checked += 1
    assert checked >= 3


def test_report_shows_the_budget_and_the_target_quotes_the_ceiling() -> None:
    point = _point(2.0, 0.9, 0.3, 1000.0, 450.0, floor_ms=0.7)
    results = {"machine": {"nproc": 2}, "scenarios": {"gen-url": {"points": [point]}}}
    target = next(t for t in report.targets(results) if t["name"] == "gen-url throughput, c=64")
    assert target["pass"] is False
    assert target["measured"].endswith("the gateway's CPU allows ≤ 0.62×"), target["measured"]


def test_no_budget_without_a_direct_rate() -> None:
    point = _point(2.0, 0.9, 0.3, 1000.0, 450.0)
    point["direct"]["rps"] = 0.0
    assert report.cpu_budget(point, cores=2) is None


def test_a_saved_report_keeps_what_was_printed_under_the_command_that_made_it(
        tmp_path, monkeypatch, capsys) -> None:
    """The README quotes ablate/compare/disk runs; `--save` keeps them as results files that
    name their command and commit, and keeps nothing from a run that failed."""
    monkeypatch.setattr(record, "RESULTS", tmp_path)
    monkeypatch.setattr(record, "BENCH", tmp_path.parent)
    monkeypatch.setattr(sys, "argv", ["disk.py", "--save", "kept"])
    with record.saved("kept", "A title", "disk.py"):
        print("| a | table |")
    assert "| a | table |" in capsys.readouterr().out  # still printed
    text = (tmp_path / "kept.md").read_text()
    assert text.startswith("## A title\n\nProduced by `.venv/bin/python bench/disk.py --save "
                           "kept` on ")
    assert "clawrouter " in text and "```\n| a | table |\n```\n" in text
    with pytest.raises(RuntimeError), record.saved("failed", "A title", "disk.py"):
        print("half a table")
        raise RuntimeError("the run broke")
    assert not (tmp_path / "failed.md").exists()
    with record.saved(None, "A title", "disk.py"):
        print("not kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.md"]
    parser = argparse.ArgumentParser()
    record.add_save_option(parser, "x")
    for bad in ("../x", "/tmp/x", ".hidden", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["--save", bad])


@pytest.mark.parametrize("name", ["latest", "preauth-on", "latency-50", "upstream-cpu",
                                  "edits-admitted-by-bytes", "xeon-7063df1"])
def test_each_committed_report_is_what_its_measurements_render_to(name: str) -> None:
    """The README quotes the .md files; they must say what the measurements in their .json
    say, under this module's current wording and targets (`bench/report.py FILE` re-renders)."""
    import json

    results = Path(report.__file__).parent / "results"
    data = json.loads((results / f"{name}.json").read_text())
    data["targets"] = report.targets(data)
    png = "latency.png" if name == "latest" else f"{name}.png"
    assert (results / f"{name}.md").read_text() == report.markdown(data, png) + "\n"
