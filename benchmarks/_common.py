"""Shared helpers for the benchmark scripts (not a test; nothing here asserts a timing)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def maxrss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 7) -> dict:
    """Measured dense matmul throughput (GFLOP/s): median and best of ``repeats`` n×n×n products.
    The bound uses the best: on a shared machine other jobs can only slow a product down."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        rates.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return {"median": median(rates), "best": max(rates), "n": n}


def timed_runs(fn, device: torch.device, warmup: int, repeats: int, per: int = 1) -> tuple[dict, object]:
    """Call ``fn`` ``warmup + repeats`` times; returns ``(result, last output)``. The result holds the
    wall and process (all threads) seconds of the timed calls divided by ``per`` (e.g. per image), the
    process's peak RSS before and after, and on CUDA the peak allocated memory over the calls."""
    rss0 = maxrss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda0 = torch.cuda.memory_allocated(device) / 2 ** 20
    times, cpu, out = [], [], None
    for i in range(warmup + repeats):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t) / per)
            cpu.append((time.process_time() - c) / per)
    res = {"times": times, "cpu": cpu, "rss_base_mb": rss0, "rss_peak_mb": maxrss_mb()}
    if device.type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        res["cuda_base_mb"] = cuda0
    return res, out


def bench_parser(doc: str, workers, rounds: int = 3, repeats: int = 3,
                 quick_repeats: int = 2) -> argparse.ArgumentParser:
    """The options every side-by-side benchmark takes (``--device --quick --rounds --repeats --warmup
    --threads`` and the hidden ``--worker``/``--out`` of its worker processes); scripts add their own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--quick", action="store_true", help=f"1 round × {quick_repeats} timed runs")
    ap.add_argument("--rounds", type=int, default=rounds, help="rounds of fresh processes per variant (interleaved)")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed runs per process")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.set_defaults(quick_repeats=quick_repeats)
    return ap


def parse_bench_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse; ``--quick`` (in the driver, not a worker) means one round of ``quick_repeats`` runs."""
    args = ap.parse_args()
    if args.quick and not args.worker:
        args.rounds, args.repeats = 1, args.quick_repeats
    return args


# ---------------------------------------------------------------------------------------- POT's released code
def code_sinkhorn(K: torch.Tensor, u: torch.Tensor, v: torch.Tensor, thresh: float = 1e-2, max_iter: int = 100):
    """Their ``Net.Sinkhorn`` on a stack of problems (re-written from its semantics): scaling updates
    until the mean change of r drops below ``thresh``, one host sync per iteration."""
    r, c = torch.ones_like(u), torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(K.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < thresh:
            break
    return torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * K


def library_kmeans(X: torch.Tensor, k: int, rng, tol: float = 1e-4, max_iter: int = 100):
    """kmeans_pytorch 0.3 with cosine distance, re-written from its semantics (no tqdm): a Python loop
    over the clusters and a host sync per iteration, as the released POT code runs it."""
    state = X[torch.from_numpy(rng.choice(len(X), k, replace=False)).to(X.device)]
    for _ in range(max_iter):
        A = X.unsqueeze(1) / X.unsqueeze(1).norm(dim=-1, keepdim=True)
        Bn = state.unsqueeze(0) / state.unsqueeze(0).norm(dim=-1, keepdim=True)
        choice = torch.argmin(1 - (A * Bn).sum(-1), dim=1)
        prev = state.clone()
        new = []
        for j in range(k):
            sel = torch.nonzero(choice == j).squeeze(1)
            new.append(torch.index_select(X, 0, sel).mean(0))
        state = torch.stack(new)
        if float(torch.sum(torch.sqrt(torch.sum((state - prev) ** 2, dim=1))) ** 2) < tol:
            break
    return choice, state


def run_worker(script: str, args: list[str], env: dict | None = None) -> dict:
    """Run ``script --worker ...`` in a fresh process (so ru_maxrss is that variant's own peak) and
    parse the JSON line it prints last."""
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for j, r in enumerate(cells):
        out.append("| " + " | ".join(c.rjust(widths[i]) if i else c.ljust(widths[i]) for i, c in enumerate(r)) + " |")
        if j == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def busy_warning(threads: int) -> str | None:
    """On a shared machine, OpenMP threads that get preempted stall every parallel op at its barrier:
    multi-thread timings then measure the other jobs. Single-thread timings stay stable."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if threads > 1 and load > 0.5:
        return (f"note: load average {load:.1f} from other jobs; with {threads} threads each op waits for "
                f"preempted threads, so timings are noisy. --threads 1 gives stable per-core figures.")
    return None


def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu or 'cpu'} ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
            f"{gpu}; load average {load:.1f} at start)")


def authors_blocks(model, tokens: torch.Tensor, num_cls: int) -> tuple[torch.Tensor, list, list]:
    """The authors' transformer blocks: attention computed explicitly (softmax(QKᵀ·scale)·V) in every
    layer and every layer's B×H×N×N probabilities kept in a list, as their forward returns them.
    Returns the final tokens (before the last norm), that list, and every layer's class tokens."""
    attn_weights, layer_cls = [], []
    for blk in model.blocks:
        a = blk.attn
        y = blk.norm1(tokens)
        B, N, D = y.shape
        qkv = a.qkv(y).reshape(B, N, 3, a.num_heads, D // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = a.attn_drop(((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1))
        attn_weights.append(attn)
        out = a.proj_drop(a.proj((attn @ v).transpose(1, 2).reshape(B, N, D)))
        tokens = tokens + blk.drop_path1(out)
        tokens = tokens + blk.drop_path2(blk.mlp(blk.norm2(tokens)))
        layer_cls.append(tokens[:, :num_cls])
    return tokens, attn_weights, layer_cls
