"""The one training loop (``tokenseg.fit``): its schedules and data-order rule, its checkpoint format, and
for each of its four tasks (classifier, segmentation network, AffinityNet, IRN) a run stopped in the
middle of an epoch that resumes to the weights of an uninterrupted run."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_post_common import make_toy_voc, one_thread, seeds_from_masks, toy_config  # noqa: E402,F401

from tokenseg.core.device import AmpStep  # noqa: E402
from tokenseg.core.errors import TokensegError  # noqa: E402
from tokenseg.core.weights import FORMAT  # noqa: E402
from tokenseg.fit import (Task, apply_lr, epoch_order, finished_step, fit, kind_of, poly_lr, read_state,  # noqa: E402
                          restore, save_state, start_log)


# ----------------------------------------------------------------------------- schedules, data order
def test_poly_and_the_two_kinds_of_parameter_group():
    assert poly_lr(3, 10, 0.1, 0.9) == 0.1 * 0.7 ** 0.9
    assert poly_lr(0, 10, 0.1, 0.9) == 0.1 and poly_lr(12, 10, 0.1, 0.9) == 0.0
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    poly = torch.optim.SGD([{"params": [a], "base_lr": 0.01}, {"params": [b], "base_lr": 0.1}], lr=1.0)
    apply_lr(poly, 0.5)  # a poly factor times each group's peak lr
    assert [g["lr"] for g in poly.param_groups] == [0.005, 0.05]
    mult = torch.optim.SGD([{"params": [a], "lr_mult": 10.0}, {"params": [b]}], lr=1.0)
    apply_lr(mult, 0.002)  # the lr itself times each group's multiplier
    assert [g["lr"] for g in mult.param_groups] == [0.02, 0.002]


def test_the_data_order_rule():
    """Epoch e of a task seeded s: a permutation from a generator seeded s·stride + e, cut to whole batches;
    a resumed epoch (offset k) visits exactly the batches the interrupted one had left."""
    full = epoch_order(11, 3, 3, seed=4, epoch=2, stride=7919)
    ref = torch.randperm(11, generator=torch.Generator().manual_seed(4 * 7919 + 2))[:9].tolist()
    assert full == ref and len(set(full)) == 9
    assert epoch_order(11, 3, 3, seed=4, epoch=2, offset=2, stride=7919) == full[6:]
    assert epoch_order(11, 3, 3, seed=4, epoch=3, stride=7919) != full
    assert torch.get_rng_state().equal(torch.get_rng_state())  # (the global generator is never drawn)


# ----------------------------------------------------------------------------- the checkpoint format
def test_a_checkpoint_holds_named_states_and_reads_tensors_only(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    np.random.seed(5)
    path = tmp_path / "c.pt"
    save_state(path, "irn", 6, {"model": net, "optimizer": opt, "scaler": None}, total_steps=8, epoch=1.5,
               done=False, settings={"lr": 0.1})
    draws = (torch.rand(2), np.random.rand(2))
    bare = torch.load(path, weights_only=True)  # no numpy objects: even a bare tensors-only load reads it
    assert (bare["kind"], bare["format"], bare["step"], bare["epoch"], bare["done"]) == ("irn", "tokenseg-irn/1", 6,
                                                                                         1.5, False)
    state = read_state(path, "irn")
    other = torch.nn.Linear(3, 2)
    opt2 = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    assert restore(state, other, opt2) == 6 and finished_step(state) is None
    assert torch.equal(other.weight, net.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.rand(2), draws[0]) and np.array_equal(np.random.rand(2), draws[1])  # RNG restored
    with pytest.raises(TokensegError, match="not an AffinityNet checkpoint.*an IRN"):
        read_state(path, "affinitynet")


def test_files_of_earlier_versions_keep_their_kind(tmp_path):
    sd = {"w": torch.zeros(1)}
    assert kind_of({"format": FORMAT, "model": sd, "config": {}}) == "classifier"  # tokenseg-checkpoint/1
    assert kind_of({"format": "tokenseg-segmentation/1", "kind": "segmentation", "model": sd,
                    "config": {}}) == "segmenter"
    assert kind_of({"format": "tokenseg-affinitynet/1", "kind": "affinitynet", "model": sd}) == "affinitynet"
    assert kind_of({"model": sd}) is None and kind_of([1]) is None
    old = {"kind": "segmentation", "model": sd, "config": {}, "step": 3}  # no "done": needs no rewrite
    assert finished_step(old) == 3


def test_a_planted_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "irn", "model": {}, "payload": datetime.timedelta(1)}, path)  # any Python object
    with pytest.raises(TokensegError, match="Python objects"):
        read_state(path, "irn")


# ----------------------------------------------------------------------------- the loop itself
def _toy_task(tmp_path, ckpt, on_step=None, log=None):
    torch.manual_seed(0)
    x, y = torch.randn(20, 4), torch.randn(20, 1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD([{"params": net.parameters(), "base_lr": 0.05}], lr=0.05, momentum=0.9)

    def batches(epoch, offset):
        order = epoch_order(20, 4, 5, seed=1, epoch=epoch, offset=offset)
        return [(x[order[i:i + 4]], y[order[i:i + 4]]) for i in range(0, len(order), 4)]

    return Task(kind="classifier", name="toy", model=net, optimizer=opt, amp=AmpStep("none", torch.device("cpu"), opt),
                schedule=lambda step, epoch: poly_lr(step, 15, 1.0, 0.9), steps_per_epoch=5, total_steps=15,
                batches=batches, forward=lambda b, at: net(b[0]),
                loss=lambda out, b, at: (((out - b[1]) ** 2).mean(), {}), checkpoint=ckpt, on_step=on_step,
                log_path=log, log_steps=log is not None, progress=False)


def test_the_loop_stopped_by_a_signal_mid_epoch_resumes_exactly(tmp_path):
    """Dropout draws from the global generator: the checkpoint's RNG state makes the resumed run exact."""
    straight = _toy_task(tmp_path, tmp_path / "a.pt", log=tmp_path / "a.jsonl")
    assert fit(straight) == 15
    log_a = [{k: v for k, v in json.loads(x).items() if k != "time"} for x in open(tmp_path / "a.jsonl")]

    def sigint(step, _):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # honoured at the step boundary

    part = _toy_task(tmp_path, tmp_path / "b.pt", sigint, log=tmp_path / "b.jsonl")
    with pytest.raises(KeyboardInterrupt):
        fit(part)
    state = read_state(tmp_path / "b.pt", "classifier")
    assert state["step"] == 7 and state["epoch"] == 1.4 and not state["done"]
    again = _toy_task(tmp_path, tmp_path / "b.pt", log=tmp_path / "b.jsonl")
    step = restore(state, again.model, again.optimizer)
    start_log(again, step)
    assert fit(again, step) == 15
    for p, q in zip(straight.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)
    log_b = [{k: v for k, v in json.loads(x).items() if k != "time"} for x in open(tmp_path / "b.jsonl")]
    assert log_b == log_a  # the log goes on where the checkpoint was, without a repeated step


# ----------------------------------------------------------------------------- the four tasks
def _interrupt_at(monkeypatch, module, calls: int) -> None:
    """SIGINT while the schedule of step ``calls`` (1-based) is asked for: the loop saves after that step."""
    real, seen = module.poly_lr, {"n": 0}

    def counting(*args):
        seen["n"] += 1
        if seen["n"] == calls:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(module, "poly_lr", counting)


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_classifier_interrupted_in_its_second_epoch(tiny_overrides, tmp_path):
    from tokenseg.config import load_config
    from tokenseg.engine import train

    common = tiny_overrides + ["train.max_steps=9", "train.eval_every=0", "model.drop_path=0.1"]
    a = train(load_config("tiny", common + [f"output_dir={tmp_path / 'a'}"]), progress=False)
    cfg = load_config("tiny", common + [f"output_dir={tmp_path / 'b'}"])

    def sigint(step, _):
        if step == 8:  # epoch 2 of 6 steps each
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=sigint)
    mid = read_state(tmp_path / "b" / "checkpoint.pt", "classifier")
    assert mid["step"] == 8 and mid["epoch"] == 8 / 6 and mid["format"] == FORMAT
    b = train(cfg, resume=True, progress=False)
    _same_weights(read_state(a, "classifier")["model"], read_state(b, "classifier")["model"])


def test_segmenter_interrupted_mid_epoch(tmp_path, monkeypatch):
    from tokenseg.data import build_dataset
    from tokenseg.segment import train as trainmod

    root = make_toy_voc(tmp_path / "voc", n_train=6, n_val=2, size=48, seed=1)
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in build_dataset(toy_config(root, tmp_path).data, "train").mask_paths:
        shutil.copy(p, masks / p.name)
    cfg = toy_config(root, tmp_path, "segment.backbone=resnet10t", "segment.feature_stage=3",
                     "segment.aspp_dilations=[1,2]", "segment.crop_size=48", "segment.batch_size=2",
                     "segment.num_workers=0", "segment.eval_at_end=false", "segment.max_steps=5")
    trainmod.train_segmentation(cfg, masks, tmp_path / "a", progress=False)
    _interrupt_at(monkeypatch, trainmod, 4)  # 3 steps per epoch: stops after step 4, inside epoch 2
    with pytest.raises(KeyboardInterrupt):
        trainmod.train_segmentation(cfg, masks, tmp_path / "b", progress=False)
    mid = read_state(tmp_path / "b" / "checkpoint.pt", "segmenter")
    assert mid["step"] == 4 and not mid["done"]
    monkeypatch.undo()
    assert trainmod.train_segmentation(cfg, masks, tmp_path / "b", resume=True, progress=False)["steps"] == 5
    _same_weights(read_state(tmp_path / "a" / "checkpoint.pt", "segmenter")["model"],
                  read_state(tmp_path / "b" / "checkpoint.pt", "segmenter")["model"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    base = tmp_path_factory.mktemp("fit")
    root = make_toy_voc(base / "voc", n_train=6, n_val=2, size=40)
    return base, root, seeds_from_masks(root, base / "seeds", "train", blur=2.0)


def test_affinitynet_interrupted_mid_epoch(toy, tmp_path, monkeypatch):
    from tokenseg.data import build_dataset
    from tokenseg.refine import affinitynet

    _, root, seeds = toy
    cfg = toy_config(root, tmp_path, "pseudo.refine=affinitynet", "pseudo.aff_backbone=resnet10t",
                     "pseudo.aff_crop=40", "pseudo.aff_batch_size=2", "pseudo.aff_max_steps=5", "pseudo.aff_radius=3",
                     "pseudo.crf_backend=torch")
    ds = build_dataset(cfg.data, "train")
    a = affinitynet.train_affinitynet(cfg, ds, ds.ids, seeds, tmp_path / "a", progress=False)
    _interrupt_at(monkeypatch, affinitynet, 4)
    with pytest.raises(KeyboardInterrupt):
        affinitynet.train_affinitynet(cfg, ds, ds.ids, seeds, tmp_path / "b", progress=False)
    mid = read_state(tmp_path / "b" / "affinitynet.pt", "affinitynet")
    assert mid["step"] == 4 and not mid["done"] and mid["settings"]["seed"] == cfg.pseudo.aff_seed == 0
    monkeypatch.undo()
    b = affinitynet.train_affinitynet(cfg, ds, ds.ids, seeds, tmp_path / "b", progress=False)
    sa, sb = read_state(a, "affinitynet"), read_state(b, "affinitynet")
    assert sa["done"] and sb["done"] and sa["step"] == sb["step"] == 5
    _same_weights(sa["model"], sb["model"])


def test_irn_interrupted_mid_epoch(toy, tmp_path):
    from tokenseg.data import build_dataset
    from tokenseg.refine import irn
    from tokenseg.refine.pseudo import _Task, find_seed_file

    _, root, seeds = toy
    cfg = toy_config(root, tmp_path, "pseudo.refine=irn", "pseudo.irn.backbone=resnet10t", "pseudo.irn.crop=64",
                     "pseudo.irn.batch_size=2", "pseudo.irn.train_radius=5", "pseudo.crf_backend=torch",
                     "pseudo.irn.max_steps=5")
    ds = build_dataset(cfg.data, "train")
    tasks = [_Task(i, find_seed_file(seeds, i), ds.image_paths[k], tmp_path / f"{i}.png") for k, i in enumerate(ds.ids)]
    labels = irn.make_ir_labels(cfg, tasks, seeds, tmp_path / "labels", progress=False)
    a = irn.train_irn(cfg, ds, ds.ids, tmp_path / "labels", tmp_path / "a", progress=False, labels=labels)

    def sigint(step):
        if step == 4:  # 3 steps per epoch
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        irn.train_irn(cfg, ds, ds.ids, tmp_path / "labels", tmp_path / "b", progress=False, labels=labels,
                      step_hook=sigint)
    mid = read_state(tmp_path / "b" / "irn.pt", "irn")
    assert mid["step"] == 4 and not mid["done"]
    b = irn.train_irn(cfg, ds, ds.ids, tmp_path / "labels", tmp_path / "b", progress=False, labels=labels)
    _same_weights(read_state(a, "irn")["model"], read_state(b, "irn")["model"])
