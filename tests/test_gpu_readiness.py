"""What a GPU run needs and the CPU never exercised, checked where a CPU can: training steps that do not
wait for the device (no host sync per step, only at logging intervals), one-line out-of-memory messages,
the shared AMP step, and the background seed writer (ordered, errors surface)."""
import dataclasses
import sys
import threading
import time
from collections import Counter

import pytest
import torch

from tokenseg.config import load_config
from tokenseg.core.device import AmpStep, FiniteWatch, oom_hint
from tokenseg.core.errors import TokensegError

SYNCS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy")


@pytest.fixture
def syncs_per_step(monkeypatch):
    """Counts host syncs (``Tensor.item``, ``float(t)``, ``bool(t)``, …) made by tokenseg's own code, by the
    number of steps done when they happened (the loops call ``FiniteWatch.add`` once per step)."""
    counts: Counter = Counter()
    done = [0]
    add = FiniteWatch.add

    def counting_add(self, loss):
        done[0] += 1
        return add(self, loss)

    monkeypatch.setattr(FiniteWatch, "add", counting_add)
    for name in SYNCS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, **k):
            if "/tokenseg/" in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                counts[done[0]] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


def test_training_steps_read_the_device_only_at_logging_intervals(tiny_overrides, syncs_per_step):
    from tokenseg.engine import LOG_EVERY, train

    # 48 images, batch 4: 12 steps in the one epoch; losses are read at steps 10 and 12 (the end)
    cfg = load_config("tiny", [*tiny_overrides, "train.batch_size=4", "train.epochs=1", "train.eval_every=0"])
    train(cfg, progress=False)
    assert LOG_EVERY == 10
    assert syncs_per_step[10] > 0 and syncs_per_step[12] > 0  # the counting sees the logging reads
    # what a step does after step k (its own compute included) reads nothing, unless k is a logging step
    assert {k: n for k, n in syncs_per_step.items() if 1 <= k < 12 and k != 10} == {}


def test_a_non_finite_loss_still_stops_training_with_the_step(tiny_overrides, monkeypatch):
    from tokenseg import engine
    from tokenseg.methods import get_method

    def nan_loss(out, batch, ctx, cfg):
        return {"cls": out["cls_logits"].sum() * float("nan")}

    def with_nan(name):
        return dataclasses.replace(get_method(name), loss=nan_loss)

    monkeypatch.setattr(engine, "get_method", with_nan)
    cfg = load_config("tiny", [*tiny_overrides, "train.batch_size=2", "train.epochs=1", "train.eval_every=0"])
    with pytest.raises(TokensegError, match="non-finite by step 10.*train.lr"):
        engine.train(cfg, progress=False)
    assert not (cfg.output_dir and (engine.Path(cfg.output_dir) / engine.CHECKPOINT_NAME).exists())


def test_cuda_out_of_memory_names_the_step_and_the_setting_to_lower(tiny_overrides, monkeypatch):
    from tokenseg import engine
    from tokenseg.methods import get_method

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "get_method", lambda name: dataclasses.replace(get_method(name), forward=boom))
    cfg = load_config("tiny", [*tiny_overrides, "train.eval_every=0"])
    with pytest.raises(TokensegError) as err:
        engine.train(cfg, progress=False)
    msg = str(err.value)
    assert "out of memory in training step 1 (a batch of 8" in msg and "train.batch_size" in msg
    assert "\n" not in msg


def test_oom_hint_leaves_other_errors_alone():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with oom_hint("x", "y"):
            raise RuntimeError("shape mismatch")
    with pytest.raises(TokensegError, match="out of memory in step 3: lower a.b"):
        with oom_hint("step 3", "a.b"):
            raise RuntimeError("CUDA error: out of memory")


def test_amp_step_is_the_plain_step_without_amp_and_clips_like_torch():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 5) * 10
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    step = AmpStep("none", torch.device("cpu"), oa, grad_clip=0.5, params=a.parameters())
    assert step.dtype is None and step.scaler is None  # auto/none on the CPU: fp32, no scaler
    for _ in range(3):
        with step.autocast():
            la = a(x).square().mean()
        step.step(la)
        ob.zero_grad()
        b(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    bf = AmpStep("bf16", torch.device("cpu"), oa)
    with bf.autocast():
        assert a(x).dtype == torch.bfloat16


def test_finite_watch_remembers_a_bad_loss_until_read():
    w = FiniteWatch()
    assert not w.seen()
    w.add(torch.tensor(1.0))
    w.add(torch.tensor(float("inf")))
    w.add(torch.tensor(2.0))
    assert w.seen() and not w.seen()


def test_background_writer_keeps_submission_order_and_raises_its_error():
    from tokenseg.core.files import BackgroundWriter

    order = []
    with BackgroundWriter(depth=2) as w:
        for i in range(6):
            w.submit(lambda i=i: (time.sleep(0.01 * (i % 3)), order.append(i)))
        assert threading.current_thread() is threading.main_thread()
    assert order == list(range(6))

    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter() as w:
            w.submit(fail)
            w.submit(lambda: order.append("after"))
    assert order[-1] == 5  # nothing runs after a failed write
