"""benchmarks/bench_fused.py end to end at toy size: its three sides train, its report holds
what BENCHMARKS.md quotes, and the fused members are their lone twins bitwise (one CPU thread)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_fused_benchmark_reports_three_sides_with_equal_members(tmp_path):
    out = tmp_path / "fused.json"
    environment = {**os.environ, "DIFFCOM_CACHE_DIR": str(tmp_path / "cache")}
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_fused.py"),
        "--dataset=nations",
        "--text-encoder=none",
        "--members=3",
        "--stage1-epochs=1",
        "--stage2-epochs=1",
        "--width=16",
        "--plain",
        "--precision=no",
        "--count-ops",
        f"--out={out}",
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=environment, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["members"] == 3 and report["device"] == "cpu" and report["threads"] == 1
    for side in ("lone", "fused", "plain"):
        assert report[f"{side}_seconds"] > 0
        assert report["trials_per_minute"][side] > 0
    assert report["ratio"] > 0 and report["plain_ratio"] > 0
    assert report["fused_failed_members"] == []
    assert report["test_metrics_equal"] is True
    assert report["test_mrr_max_abs_difference"] == 0.0
    assert "training epochs (all members)" in report["fused_parts_seconds"]
    assert Path(f"{out}.prof").stat().st_size > 0  # the profile itself, for pstats
    # Nations' 909 training queries in batches of 128: 8 batches; a 3-member step dispatches
    # some hundreds of operators (a per-member loop would be thousands at 16 members).
    operators = report["fused_operators"]
    assert operators["batches"] == 8 and operators["members"] == 3
    assert 50 < operators["operators_per_batch"] < 5000
    assert operators["device_reads_per_batch"] < 10
    assert "ratio plain/fused:" in completed.stdout


def test_plain_with_a_cut_stage_2_is_refused():
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_fused.py"),
            "--scale=fb15k-237",
            "--plain",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert completed.returncode == 2
    assert "--plain compares whole runs" in completed.stderr
