"""`make demo` end to end: a short run of the four-process stack ends by itself."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tests.stack import ROOT


def test_run_the_whole_stack_when_a_short_demo_is_asked_for(tmp_path: Path) -> None:
    data_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), "--duration", "4", "--free-ports",
         "--no-monitor", "--data-dir", str(data_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(data_dir / "trades.csv", newline="") as f:
        trades = list(csv.DictReader(f))
    with open(data_dir / "performance.csv", newline="") as f:
        performance = list(csv.DictReader(f))
    assert trades, "the default battle traded nothing"
    assert all(t["buy_trader"] != t["sell_trader"] for t in trades)
    traders = {row["trader_id"] for row in performance}
    assert len(traders) >= 5  # the shutdown snapshot has a row per trader that traded
    report = data_dir / "report.html"
    assert report.stat().st_size > 0 and "<svg" in report.read_text()
    for path in (data_dir / "trades.csv", data_dir / "performance.csv", report):
        assert str(path) in done.stdout
    assert "Final leaderboard" in done.stdout + done.stderr
