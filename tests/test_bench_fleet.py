"""bench/fleet.py --quick runs end to end and writes every figure the fleet benchmark reports.

Its figures are not asserted (timings belong to the benchmark); what is asserted holds
on any machine: every job is accounted for, nothing hung, no slot is left held, the gate
crashed no backend and loaded each model at least once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("gate", "round_robin", "loaded_first")
RUN_FIELDS = {
    "jobs",
    "ok",
    "failed",
    "hung",
    "outcomes",
    "loads",
    "evictions",
    "crashes",
    "makespan",
    "ttft_p50",
    "ttft_p99",
    "placement",
    "backends",
    "resent",
}


def test_quick_fleet_bench_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    proc = subprocess.run(
        [sys.executable, "bench/fleet.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| makespan / lower bound |" in proc.stdout
    doc = json.loads(out.read_text())
    assert {"date", "machine", "mixes", "killed"} <= set(doc)
    assert list(doc["mixes"]) == ["even"]  # --quick runs the even mix only
    mix = doc["mixes"]["even"]
    setup = mix["setup"]
    assert sum(mix["jobs_per_model"].values()) == setup["jobs"]

    bound = mix["lower_bound"]
    assert bound["seconds"] > bound["work_over_slots"] > 0
    assert bound["seconds"] >= bound["naive_seconds"]
    assert bound["min_loads"] == setup["models"]

    for name in STRATEGIES:
        run = mix["runs"][name]
        assert RUN_FIELDS <= set(run), name
        assert run["jobs"] == setup["jobs"] == run["ok"] + run["failed"]
        assert sum(run["outcomes"].values()) == run["jobs"]
        assert run["hung"] == 0
        assert run["makespan"] > 0 and run["ttft_p99"] >= run["ttft_p50"] > 0
        # The fakes' readings during the flood: each backend loaded something, and no
        # more slots were busy than it offers.
        line = run["timeline"]["backends"]
        assert set(line) == {"a", "b", "c"}
        for row in line.values():
            assert row["places"] and 0 <= row["busy_slot_s"] <= row["offered_slot_s"] + 1e-6

    gate = mix["runs"]["gate"]
    assert gate["crashes"] == 0
    assert gate["loads"] >= setup["models"]  # every model had to load once somewhere
    assert gate["held_after"] == {"running": 0, "waiting": 0}
    assert set(mix["targets"]) >= {"crashes", "loads", "makespan_vs_bound", "makespan_vs_best_peer"}

    killed = doc["killed"]
    assert RUN_FIELDS <= set(killed)
    assert killed["killed"]["backend"] == "a" and killed["killed"]["at"] > 0
    assert killed["hung"] == 0
    assert killed["ok"] + killed["failed"] == setup["jobs"]
    assert killed["held_after"] == {"running": 0, "waiting": 0}
