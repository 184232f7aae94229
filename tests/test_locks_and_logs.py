"""One writer per output folder for every command; logs that read well in a file."""
import io
import json
import subprocess
import sys
import time

import pytest

from tokenseg.cli import main
from tokenseg.core.progress import LineProgress, progress_bar

HOLD = """
import sys, time
from tokenseg.core.locks import output_lock
with output_lock(sys.argv[1], "tokenseg train (the other run)"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of a folder."""
    procs = []

    def hold(folder):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_second_writer_of_a_folder_is_told_who_holds_it(tiny_overrides, tmp_path, holder, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny", *tiny_overrides, "train.epochs=1", "--quiet"]) == 0
    p = holder(run)
    assert main(["train", "tiny", *tiny_overrides, "train.epochs=1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(p.pid) in err and "the other run" in err
    seeds = run / "seeds" / "val"
    q = holder(seeds)
    assert main(["maps", "tiny", *tiny_overrides, "--split", "val", "--quiet"]) == 2
    assert str(q.pid) in capsys.readouterr().err
    q.kill()
    q.wait()  # a killed holder's lock is taken over
    assert main(["maps", "tiny", *tiny_overrides, "--split", "val", "--quiet"]) == 0
    out = tmp_path / "pseudo"
    r = holder(out)
    assert main(["pseudo", "tiny", *tiny_overrides, "--seeds", str(seeds / "fused_affinity"), "--out", str(out),
                 "pseudo.split=val", "--quiet"]) == 2
    assert str(r.pid) in capsys.readouterr().err


def test_outputs_inside_the_dataset_are_refused_for_train_and_maps(tiny_overrides, tmp_path, capsys):
    from tokenseg.config import load_config
    from tokenseg.data import build_dataset

    from pathlib import Path

    cfg = load_config("tiny", tiny_overrides)
    root = Path(build_dataset(cfg.data, "val").image_paths[0]).parent.parent  # the synthetic VOC root
    assert main(["train", "tiny", *tiny_overrides, f"output_dir={root}/run", "--quiet"]) == 2
    assert "inside the dataset" in capsys.readouterr().err
    assert not (root / "run").exists()


def test_line_progress_prints_whole_lines_with_an_eta():
    buf = io.StringIO()
    bar = LineProgress(total=50, desc="train", unit="step", file=buf, seconds=3600)
    for _ in range(50):
        bar.update()
        time.sleep(0.001)
    bar.set_postfix(loss="0.5")
    bar.close()
    bar.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert len(lines) == 10  # every 10 %, the last one not repeated by close()
    assert lines[0].startswith("train: 5/50 step (10%)") and "ETA" in lines[0]
    assert lines[-1].startswith("train: 50/50 step (100%)")


def test_progress_bar_is_plain_lines_when_not_a_terminal():
    buf = io.StringIO()
    assert isinstance(progress_bar(total=3, file=buf), LineProgress)


def test_resumed_training_log_reads_as_one_run(tiny_overrides, tmp_path):
    """metrics.jsonl after a kill and a resume: no step logged twice, epochs counted from 1."""
    from tokenseg.config import load_config
    from tokenseg.engine import train

    over = [*tiny_overrides, "train.checkpoint_every=4", "train.epochs=2", "train.eval_every=0"]

    class Kill(Exception):
        pass

    def kill_at(step, _):
        if step == 11:
            raise Kill

    with pytest.raises(Kill):
        train(load_config("tiny", over), progress=False, on_step=kill_at)
    train(load_config("tiny", over), resume=True, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r or "total" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12
    assert all(1 <= r["epoch"] <= 2 for r in log) and log[-1]["epoch"] == 2  # counted from 1
