"""benchmarks/gpu_suite.py: the one command that fills the GPU table, run here on the CPU at smoke sizes so it
cannot rot between GPU runs; its per-row failure handling and the DDP check (gloo, two CPU ranks)."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
STATUSES = {"ok", "partial", "skipped", "error", "oom", "timeout"}


def load_suite():
    if "gpu_suite" not in sys.modules:
        sys.path.insert(0, str(SCRIPT.parent))
        spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_suite"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["gpu_suite"]


def test_smoke_run_writes_a_row_per_target(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    md = (tmp_path / "out" / "gpu_suite.md").read_text()
    names = [r[0] for r in load_suite().ROWS]
    assert [r["row"] for r in res["rows"]] == names and res["smoke"] and res["device"] == "cpu"
    for r in res["rows"]:
        assert r["status"] in STATUSES, r
        if r["status"] in ("ok", "partial"):  # figures: ours always, theirs unless the reason says why not
            assert r["ours"]["s"] > 0 and r["ours_text"] != "-", r
            assert r["theirs"] and r["theirs"]["s"] > 0 or r["reason"], r
            assert r["speedup"] is None or abs(r["speedup"] - r["theirs"]["s"] / r["ours"]["s"]) < 1e-9
        else:
            assert r["reason"], r
        assert f"| {r['row']}" in md
    # on the CPU every row but DDP measures (DDP needs two GPUs and says so)
    by = {r["row"]: r for r in res["rows"]}
    assert all(by[n]["status"] in ("ok", "partial") for n in names if n != "DDP"), \
        {n: by[n].get("reason") for n in names}
    assert by["DDP"]["status"] == "skipped" and "CUDA" in by["DDP"]["reason"]
    seeds = by["seeds fp32"]
    assert seeds["ours"]["voc_train_s"] == pytest.approx(1464 * seeds["ours"]["s"])
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(lines) == len(names) + 1  # header + one per row


def test_a_failing_or_slow_row_records_why_and_the_next_runs():
    gs = load_suite()
    ctx = gs.Ctx(torch.device("cpu"), gs.SMOKE, 0.0)

    def boom(ctx):
        raise ValueError("broken input\nsecond line")

    def slow(ctx):
        t = time.monotonic()
        while time.monotonic() - t < 5:
            pass

    def oom(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert gs.run_row("x", boom, ctx, 5)["reason"] == "ValueError: broken input"
    row = gs.run_row("y", slow, ctx, 0.3)
    assert row["status"] == "timeout" and row["seconds"] < 2
    assert gs.run_row("z", oom, ctx, 5)["status"] == "oom"
    ok = gs.run_row("w", lambda c: {"ours": {"s": 0.5}, "theirs": {"s": 1.0}, "speedup": 2.0, "met": True,
                                    "show": lambda d: f"{d['s']} s"}, ctx, 5)
    assert ok["status"] == "ok" and ok["ours_text"] == "0.5 s" and ok["theirs_text"] == "1.0 s"


def test_ddp_check_gives_one_process_gradients_on_two_cpu_ranks():
    gs = load_suite()
    res = gs.ddp_check("gloo", 2)
    assert res["ours"]["world"] == 2 and res["ours"]["max_grad_diff"] < 1e-5
