"""benchmarks/gpu_check.py --dry-run: the GPU script's whole code path (levers, cascade stages, agreement with
ONNX Runtime) on the CPU with tiny towers, so the script a GPU machine runs is known to run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_runs_end_to_end(tmp_path):
    out = tmp_path / "dry"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(Path(str(out) + ".json").read_text())
    levers = result["levers"]
    assert levers["dry_run"] and set(levers["sets"]) == {"pair", "five"}
    modes = {row["mode"] for row in levers["sets"]["pair"]["rows"]}
    assert {"serial", "concurrent", "compiled", "backend"} <= modes
    assert any(m.startswith("single ") for m in modes)
    assert [a["ok"] for a in levers["agreement"]] == [True]        # torch-cuda's forward == ONNX Runtime fp32
    md = Path(str(out) + ".md").read_text()
    assert "DRY RUN on the CPU" in md and "| pair | 1 | fp32 |" in md
