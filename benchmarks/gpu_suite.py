"""Every GPU figure of the project in one short call: ours side by side with a re-implementation of the
authors' approach, in the same process, on random weights and generated images (nothing to download).

    python benchmarks/gpu_suite.py --out $OUT      # on a CUDA machine: ≤ 8 minutes wall
    python benchmarks/gpu_suite.py --smoke         # on the CPU at tiny sizes, in seconds (the test suite runs it)

Rows (the authors' side is the re-implementation in the named benchmark script, imported from there):

``seeds default`` / ``seeds fp32`` / ``seeds bf16``  MCTformer+ seeds (DeiT-S, 500×375 images, scales
    1.0/0.75/1.25 + flip, ``fused_affinity``) vs their batch-1 loop (``bench_maps.authors_maps``, fp32, the
    attention of all layers stacked): the default (``maps.mode=auto``: their inference reproduced exactly,
    ``tokenseg.methods.mctformer.authors``, one image at a time) and ``maps.mode=tokenseg`` (``tokenseg.maps.compute_maps``,
    batches of 16) in fp32 and bf16; images/s, peak GPU memory and the projected time for VOC train
    (1,464 images). Target: ≥ 5× theirs and VOC train in < 60 s.
``train step``  MCTformer+ training step, batch 32 at 448² (``train.amp=auto``: bf16 on CUDA) vs theirs
    (explicit attention in every layer, fp16 autocast + GradScaler; ``bench_train``). Target: ≥ 2× at
    ≤ 0.5× their peak memory.
``CTI step``  the CTI step as ``cti.yaml`` trains (batch 64 at 224², fp32) vs their four passes
    (``bench_cti.their_update``).
``CLIP-ES`` / ``CLIP-ES fp16``  ViT-B/16 seeds of 500×375 images (ours in batches; ``clip_es.dtype`` fp32,
    the default, and fp16) vs their per-class backward loop (``bench_clip_es.authors_maps``, fp16 weights).
    Target: ≥ 3×.
``POT stages``  POT's prototype stages (k-means, OT, activation; + backward) as a share of a whole
    training step (batch 16 at 512²) vs the released code's per-image, per-class loop (``bench_pot``).
``IRN walk``  the random walk of one 500×375 image (``refine.irn.propagate``, the configured walk and
    dtype) vs their dense hw×hw matrix squared 8 times (``bench_irn.authors_walk``, float32).
``DenseCRF``  one 500×375 image, 3 labels, PSA parameters: the pure-torch backend on the GPU vs
    pydensecrf on the CPU (skipped with the reason when pydensecrf is not installed).
``DDP``  two ranks on the first two GPUs: one step of a small network under DistributedDataParallel gives
    the gradients of one process on the whole batch (skipped with the reason on one GPU).

Every row runs under its own time budget (``--budget`` seconds in all, shared out by weight) inside a
try/except: a row that fails, runs out of memory or out of time records why and the next row runs. The
table and JSON are rewritten after every row, so a run cut short still leaves the rows it finished.
Timings: median of the timed runs after one warm-up (as many runs as the row's budget allows, up to
``--repeats``); peak memory = ``torch.cuda.max_memory_allocated`` over the timed runs (weights included).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:  # a checkout that is not pip-installed (a freshly lent GPU machine) runs from its src/
    import tokenseg  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import machine, median, sync, table, timed_runs  # noqa: E402

VOC_TRAIN = 1464
TOTAL_BUDGET_S = 450.0  # the rows on CUDA: 7.5 minutes, so start-up and writing stay within 8
SMOKE_BUDGET_S = 120.0


@dataclass
class Sizes:
    """The workload of every row; ``FULL`` on CUDA, ``SMOKE`` on the CPU in seconds."""

    image: tuple[int, int] = (375, 500)  # VOC-sized (h, w)
    seeds_batch: int = 16
    train_batch: int = 32
    train_size: int = 448
    cti_batch: int = 64
    cti_size: int = 224
    clip_batch: int = 16
    pot_batch: int = 16
    pot_side: int = 512
    repeats: int = 5
    warmup: bool = True  # one untimed call first (the smoke run times its first call: structure, not speed)


FULL = Sizes()
SMOKE = Sizes(image=(48, 64), seeds_batch=2, train_batch=2, train_size=64, cti_batch=2, cti_size=64, clip_batch=2,
              pot_batch=2, pot_side=128, repeats=1, warmup=False)


class RowTimeout(Exception):
    pass


class SkipRow(Exception):
    """The row cannot run here (the reason is its message)."""


@dataclass
class Ctx:
    device: torch.device
    sizes: Sizes
    deadline: float  # time.monotonic() at which this row's budget ends
    cache: dict = field(default_factory=dict)  # figures shared between rows (the authors' side, once)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@contextmanager
def time_limit(seconds: float):
    """Raise :class:`RowTimeout` in the main thread after ``seconds`` (between Python operations)."""
    def on_alarm(signum, frame):
        raise RowTimeout(f"over its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def measure(fn, ctx: Ctx, per: int = 1, share: float = 0.5) -> dict:
    """One warm-up call, then as many timed calls as fit ``share`` of the row's remaining budget (1 to
    ``sizes.repeats``). Returns seconds per item (median), items/s and the peak memory (CUDA)."""
    if not ctx.sizes.warmup:
        res, _ = timed_runs(fn, ctx.device, 0, 1, per=per)
        return {"s": res["times"][0], "per_s": 1.0 / res["times"][0], "runs": 1, "peak_mb": res.get("cuda_peak_mb")}
    t = time.perf_counter()
    fn()
    sync(ctx.device)
    once = max(time.perf_counter() - t, 1e-6)
    left = ctx.deadline - time.monotonic()
    n = int(max(1, min(ctx.sizes.repeats, share * left / once)))
    res, _ = timed_runs(fn, ctx.device, 0, n, per=per)
    s = median(res["times"])
    return {"s": s, "per_s": 1.0 / s, "runs": n, "peak_mb": res.get("cuda_peak_mb")}


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def mem_text(d: dict) -> str:
    """", 1.23 GiB" for a side measured on CUDA; nothing on the CPU (no per-call peak there)."""
    return f", {d['peak_mb'] / 1024:.2f} GiB" if d.get("peak_mb") else ""


# ------------------------------------------------------------------------------------------------- rows
def authors_once(ctx: Ctx, key: str, make) -> dict:
    """The authors' side, measured once and shared by the rows that compare against it (fp32 and bf16
    seeds, fp32 and fp16 CLIP-ES); ``make()`` builds the callable."""
    if key not in ctx.cache:
        fn = make()
        ctx.cache[key] = measure(fn, ctx, share=0.3)
        del fn
        free(ctx)
    return ctx.cache[key]


def seeds_authors(ctx: Ctx) -> dict:
    """Their batch-1 loop on one image (fp32)."""
    import bench_maps as bm

    def make():
        model = bm.build(ctx.device, 1.0)
        labels = np.zeros(bm.NUM_CLASSES, np.float32)
        labels[bm.PRESENT] = 1
        img = bm.make_image(0, ctx.sizes.image)
        return lambda: bm.authors_maps(model, img, labels, ctx.device)

    return authors_once(ctx, "seeds_authors", make)


def seeds_figures(ours: dict, theirs: dict) -> dict:
    for side in (ours, theirs):
        side["voc_train_s"] = VOC_TRAIN * side["s"]
    speed = theirs["s"] / ours["s"]
    return {"ours": ours, "theirs": theirs, "speedup": speed, "met": speed >= 5 and ours["voc_train_s"] < 60,
            "show": lambda d: f"{d['per_s']:.1f} img/s, VOC train {d['voc_train_s']:.0f} s{mem_text(d)}"}


def row_seeds_default(ctx: Ctx) -> dict:
    """``maps.mode=auto``, MCTformer+'s default: the authors' inference reproduced exactly (one image at
    a time, attention reduced on the fly; ``tokenseg.methods.mctformer.authors``)."""
    import bench_maps as bm

    theirs = seeds_authors(ctx)
    model = bm.build(ctx.device, 1.0)
    labels = np.zeros(bm.NUM_CLASSES, np.float32)
    labels[bm.PRESENT] = 1
    img = bm.make_image(0, ctx.sizes.image)
    return seeds_figures(measure(lambda: bm.authors_mode_maps(model, img, labels, ctx.device), ctx), theirs)


def row_seeds(dtype: str):
    """``maps.mode=tokenseg`` (batched, fused attention) in ``dtype``."""
    def run(ctx: Ctx) -> dict:
        import bench_maps as bm

        theirs = seeds_authors(ctx)
        model = bm.build(ctx.device, 1.0)
        n = ctx.sizes.seeds_batch
        imgs = [np.asarray(bm.make_image(seed, ctx.sizes.image)) for seed in range(n)]
        img_u8 = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).to(ctx.device)
        lab = torch.zeros(n, bm.NUM_CLASSES, device=ctx.device)
        lab[:, bm.PRESENT] = 1
        cfg = bm.maps_cfg(dtype)
        cfg.batch_size = n
        return seeds_figures(measure(lambda: bm.ours_maps(model, img_u8, lab, cfg), ctx, per=n), theirs)
    return run


def row_train(ctx: Ctx) -> dict:
    import bench_train as bt

    ours_variant = "ours-bf16" if ctx.cuda else "ours-fp32"  # train.amp=auto
    s = ctx.sizes
    res = {}
    for side, variant in (("theirs", "authors"), ("ours", ours_variant)):
        step = bt.make_step(variant, ctx.device, s.train_batch, s.train_size)
        res[side] = measure(step, ctx, share=0.3 if side == "theirs" else 0.8)
        del step
        free(ctx)
    return two_sided(res, lambda sp, mem: sp >= 2 and (mem is None or mem <= 0.5), "step")


def row_cti(ctx: Ctx) -> dict:
    import bench_cti as bc

    s = ctx.sizes
    res = {}
    for side, variant in (("theirs", "authors"), ("ours", "ours")):
        step = bc.make_train_step(variant, ctx.device, s.cti_batch, s.cti_size)
        res[side] = measure(step, ctx, share=0.3 if side == "theirs" else 0.8)
        del step
        free(ctx)
    return two_sided(res, lambda sp, mem: None, "step")


def clip_authors(ctx: Ctx) -> dict:
    """Their per-class loop on one image (fp16 weights on CUDA)."""
    import bench_clip_es as bce

    return authors_once(ctx, "clip_authors", lambda: bce.make_fn("authors", ctx.device, 1, size=ctx.sizes.image)[0])


def row_clip(dtype: str):
    def run(ctx: Ctx) -> dict:
        import bench_clip_es as bce

        theirs = clip_authors(ctx)
        fn, n = bce.make_fn(dtype, ctx.device, ctx.sizes.clip_batch, size=ctx.sizes.image)
        ours = measure(fn, ctx, per=n)
        speed = theirs["s"] / ours["s"]
        return {"ours": ours, "theirs": theirs, "speedup": speed, "met": speed >= 3,
                "show": lambda d: f"{d['per_s']:.1f} img/s{mem_text(d)}"}
    return run


def row_pot(ctx: Ctx) -> dict:
    import bench_pot as bp

    variants = bp.make_variants(ctx.device, True, ctx.sizes.pot_batch, ctx.sizes.pot_side)
    m = {name: measure(variants[name], ctx, share=0.25) for name in ("step", "stages", "loop")}
    step, stages, loop = m["step"]["s"], m["stages"]["s"], m["loop"]["s"]
    ours = {"s": stages, "share_of_step": stages / step, "step_s": step, "peak_mb": m["stages"]["peak_mb"]}
    theirs_step = step - stages + loop  # the same step with their loop in place of our stages
    theirs = {"s": loop, "share_of_step": loop / theirs_step, "step_s": theirs_step, "peak_mb": m["loop"]["peak_mb"]}
    return {"ours": ours, "theirs": theirs, "speedup": loop / stages, "met": None,
            "show": lambda d: f"{d['s'] * 1e3:.0f} ms = {100 * d['share_of_step']:.1f} % of a {d['step_s']:.2f} s step"}


def row_irn(ctx: Ctx) -> dict:
    import bench_irn as bi

    from tokenseg.config import IRNConfig
    from tokenseg.refine.irn import propagate

    ic = IRNConfig()
    h, w = bi.grid_of(ctx.sizes.image[1], ctx.sizes.image[0])
    edge, x = bi.make_inputs(h, w, 2, 1)
    edge, x = edge.to(ctx.device), x.to(ctx.device)
    dt = {"float64": torch.float64, "float32": torch.float32}[ic.walk_dtype]
    res = {"ours": measure(lambda: propagate(x.to(dt), edge.to(dt), None, ic.radius, ic.beta, ic.exp_times, ic.walk),
                           ctx, share=0.4)}
    res["theirs"] = measure(lambda: bi.authors_walk(x[0], edge[0]), ctx, share=0.5)
    return two_sided(res, lambda sp, mem: None, "image", note=f"{ic.walk} {ic.walk_dtype} walk on a {h}×{w} grid")


def row_crf(ctx: Ctx) -> dict:
    from tokenseg.core.crf import CRF_PRESETS, _crf_pydensecrf, crf_torch, pydensecrf_available

    import bench_maps as bm

    img = np.asarray(bm.make_image(0, ctx.sizes.image))
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(3, *ctx.sizes.image, generator=g), 0).numpy()
    p = CRF_PRESETS["psa"]
    res = {"ours": measure(lambda: crf_torch(img, probs, p, device=ctx.device), ctx, share=0.4)}
    show = lambda d: f"{d['s'] * 1e3:.0f} ms/img{mem_text(d)}"  # noqa: E731
    if not pydensecrf_available():
        return {"ours": res["ours"], "theirs": None, "speedup": None, "met": None, "show": show,
                "reason": "pydensecrf not installed (pip install \"tokenseg[crf]\"): their side not measured"}
    cpu = Ctx(torch.device("cpu"), ctx.sizes, ctx.deadline, ctx.cache)
    res["theirs"] = measure(lambda: _crf_pydensecrf(img, probs, p), cpu, share=0.8)
    return {**two_sided(res, lambda sp, mem: None, "image"), "show": show}


def two_sided(res: dict, target, unit: str, note: str = "") -> dict:
    """Speed-up and memory ratio of two measured sides; ``target(speedup, memory ratio)`` → met."""
    ours, theirs = res["ours"], res["theirs"]
    speed = theirs["s"] / ours["s"]
    mem = ours["peak_mb"] / theirs["peak_mb"] if ours.get("peak_mb") and theirs.get("peak_mb") else None

    def show(d):
        t = f"{d['s'] * 1e3:.0f} ms/{unit}" if d["s"] < 10 else f"{d['s']:.1f} s/{unit}"
        return t + mem_text(d)

    out = {"ours": ours, "theirs": theirs, "speedup": speed, "memory_ratio": mem, "met": target(speed, mem),
           "show": show}
    if note:
        out["note"] = note
    return out


def row_ddp(ctx: Ctx) -> dict:
    n = torch.cuda.device_count() if ctx.cuda else 0
    if n < 2:
        raise SkipRow(f"{n} CUDA device(s) visible; the DDP row needs 2")
    return {**ddp_check("nccl", 2), "met": None}


def _ddp_worker(rank: int, world: int, backend: str, port: int, out: str) -> None:
    """One rank: a DDP step on its half of a fixed batch; rank 0 also runs the whole batch alone and
    writes the largest gradient difference and the step times."""
    import torch.distributed as dist
    import torch.nn.functional as F

    import copy

    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # one GPU per rank (NCCL refuses two ranks on one device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(16, 20)).to(dev)
    single = copy.deepcopy(net)  # the same weights, outside DDP
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[rank] if backend == "nccl" else None)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8 * world, 3, 64, 64, generator=g).to(dev), torch.rand(8 * world, 20, generator=g).to(dev)
    part = slice(rank * 8, rank * 8 + 8)
    times = []
    for _ in range(3):
        ddp.zero_grad(set_to_none=True)
        sync(dev)
        t = time.perf_counter()
        F.binary_cross_entropy_with_logits(ddp(x[part]), y[part]).backward()
        sync(dev)
        times.append(time.perf_counter() - t)
    grads = [p.grad.clone() for p in net.parameters()]
    if rank == 0:
        single.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(single(x), y).backward()
        diff = max(float((a - p.grad).abs().max()) for a, p in zip(grads, single.parameters()))
        Path(out).write_text(json.dumps({"max_grad_diff": diff, "s": median(times), "world": world}))
    # every rank done before the group goes, DDP's reducer released first: a rank that tears gloo down while
    # another still talks to it aborts now and then ("terminate called without an active exception")
    dist.barrier()
    del ddp
    dist.destroy_process_group()


def ddp_check(backend: str, world: int) -> dict:
    """Spawn ``world`` ranks (:func:`_ddp_worker`); the DDP gradients must equal the single-process ones."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        mp.spawn(_ddp_worker, args=(world, backend, port, out), nprocs=world, join=True)
        r = json.loads(Path(out).read_text())
    if r["max_grad_diff"] > 1e-4:
        raise RuntimeError(f"DDP gradients differ from one process's by {r['max_grad_diff']:.1e}")
    return {"ours": r, "theirs": None, "speedup": None,
            "show": lambda d: f"{world} ranks, {d['s'] * 1e3:.1f} ms/step, max |Δ grad| {d['max_grad_diff']:.1e}",
            "reason": "a sanity check: no authors' counterpart"}


# (name, function, share of the total budget, target as printed)
ROWS = [
    ("seeds default", row_seeds_default, 0.10, "≥ 5×, VOC train < 60 s"),
    ("seeds fp32", row_seeds("fp32"), 0.07, "≥ 5×, VOC train < 60 s"),
    ("seeds bf16", row_seeds("bf16"), 0.05, "≥ 5×, VOC train < 60 s"),
    ("train step", row_train, 0.16, "≥ 2× at ≤ 0.5× memory"),
    ("CTI step", row_cti, 0.12, "-"),
    ("CLIP-ES", row_clip("fp32"), 0.13, "≥ 3×"),
    ("CLIP-ES fp16", row_clip("fp16"), 0.05, "≥ 3×"),
    ("POT stages", row_pot, 0.13, "small share of the step"),
    ("IRN walk", row_irn, 0.08, "-"),
    ("DenseCRF", row_crf, 0.06, "-"),
    ("DDP", row_ddp, 0.05, "equal gradients"),
]


def run_row(name: str, fn, ctx: Ctx, budget: float) -> dict:
    """Run one row under ``budget`` seconds; every failure becomes a status and a reason."""
    t0 = time.monotonic()
    ctx.deadline = t0 + budget
    row = {"row": name, "status": "ok", "reason": ""}
    try:
        with time_limit(budget):
            res = fn(ctx)
        show = res.pop("show")
        row.update(res)
        row["ours_text"] = show(res["ours"]) if res.get("ours") else "-"
        row["theirs_text"] = show(res["theirs"]) if res.get("theirs") else "-"
        if res.get("reason"):
            row["status"] = "partial"
    except SkipRow as exc:
        row.update(status="skipped", reason=str(exc))
    except RowTimeout as exc:
        row.update(status="timeout", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - the next row must run whatever this one did
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.update(status="oom" if oom else "error", reason=f"{type(exc).__name__}: {first}"[:300],
                   traceback=traceback.format_exc(limit=6))
    row["seconds"] = round(time.monotonic() - t0, 1)
    free(ctx)
    return row


def markdown(rows: list[dict], header: str) -> str:
    def fmt(r, key):
        v = r.get(key)
        return "-" if v is None else f"{v:.2f}×"

    body = [[r["row"], r.get("ours_text", "-"), r.get("theirs_text", "-"), fmt(r, "speedup"),
             fmt(r, "memory_ratio"), r["target"],
             {True: "yes", False: "no"}.get(r.get("met"), "-"), r["status"],
             (r.get("reason") or r.get("note") or "").replace("|", "/")] for r in rows]
    return header + "\n\n" + table(["row", "ours", "theirs (re-implemented)", "speed-up", "memory ours/theirs",
                                    "target", "met", "status", "note"], body) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-suite"), help="output folder (default $OUT)")
    ap.add_argument("--smoke", action="store_true", help="the CPU at tiny sizes, in seconds (the test suite's run)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for all rows (default 450 on CUDA, 120 smoke)")
    ap.add_argument("--rows", default="", help="comma-separated subset of the row names")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (--smoke: cpu)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    name = "cpu" if args.smoke else args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device (use --smoke to check the script on the CPU)")
    device = torch.device(name)
    sizes = SMOKE if args.smoke else FULL
    total = args.budget or (SMOKE_BUDGET_S if args.smoke else TOTAL_BUDGET_S)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [w for w in wanted if w not in {r[0] for r in ROWS}]
    if unknown:
        raise SystemExit(f"gpu_suite: unknown row(s) {unknown}; rows: {', '.join(r[0] for r in ROWS)}")
    rows_spec = [r for r in ROWS if not wanted or r[0] in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tokenseg.core.files import write_json_atomic, write_text_atomic

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"## GPU figures ({where}{', smoke sizes' if args.smoke else ''})\n\n"
              f"`python benchmarks/gpu_suite.py{' --smoke' if args.smoke else ''}`; machine: {machine()}; "
              f"random weights, generated images")
    ctx = Ctx(device, sizes, 0.0)
    rows: list[dict] = []
    weight_left = sum(r[2] for r in rows_spec)
    for name, fn, weight, target in rows_spec:
        left = total - (time.monotonic() - start)
        budget = left * weight / weight_left
        weight_left -= weight
        if budget < 1.0:
            row = {"row": name, "status": "skipped", "reason": f"no time left of the {total:.0f} s budget"}
        else:
            print(f"gpu_suite: {name} (budget {budget:.0f} s)", flush=True)
            row = run_row(name, fn, ctx, budget)
        row["target"] = target
        rows.append(row)
        print(f"  {row['status']}: ours {row.get('ours_text', '-')}; theirs {row.get('theirs_text', '-')}"
              f"{'; ' + row['reason'] if row.get('reason') else ''} ({row.get('seconds', 0)} s)", flush=True)
        result = {"device": str(device), "device_name": where, "smoke": args.smoke, "machine": machine(),
                  "torch": torch.__version__, "wall_s": round(time.monotonic() - start, 1), "rows": rows,
                  "sizes": vars(sizes)}
        write_text_atomic(out / "gpu_suite.md", markdown(rows, header))
        write_json_atomic(out / "gpu_suite.json", json.loads(json.dumps(result, default=str)))
    print()
    print(markdown(rows, header))
    print(f"gpu_suite: {len(rows)} rows in {time.monotonic() - start:.0f} s → {out / 'gpu_suite.md'}, "
          f"{out / 'gpu_suite.json'}")
    return result


if __name__ == "__main__":
    main()
