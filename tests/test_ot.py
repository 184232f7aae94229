"""tokenseg.core.ot against independent references: the POT library (ot.sinkhorn, ot.bregman.sinkhorn_log),
scipy minimisation of the entropic objective, per-problem loops written here with the released POT
code's semantics, scikit-learn's KMeans, and (when installed) kmeans_pytorch itself."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

from tokenseg.core.errors import TokensegError
from tokenseg.core.ot import gather_rows, kmeans, kmeans_pytorch_init, sinkhorn, sinkhorn_code, topk_per_column

try:
    import ot  # the POT library (a dev extra): the reference solver
except ImportError:  # pragma: no cover
    ot = None
needs_pot = pytest.mark.skipif(ot is None, reason="the POT library (pip install pot) is not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    """These are loops of small-tensor ops: extra threads add nothing, and on a busy machine every
    preempted OpenMP thread stalls each op at its barrier (measured 5 s → 25-50 s for this file)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _problem(M, N, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(M, N, generator=g, dtype=dtype) * 2  # 1 − cos ∈ [0, 2], as POT's cost
    a = torch.rand(M, generator=g, dtype=dtype) + 0.1
    b = torch.rand(N, generator=g, dtype=dtype) + 0.1
    return cost, a / a.sum(), b / b.sum()


def _pad(problems, fill=float("nan")):
    """Stack problems of different sizes, padding with garbage that a correct mask never reads."""
    B = len(problems)
    M = max(p[0].shape[0] for p in problems)
    N = max(p[0].shape[1] for p in problems)
    dt = problems[0][0].dtype
    cost = torch.full((B, M, N), fill, dtype=dt)
    a = torch.full((B, M), fill, dtype=dt)
    b = torch.full((B, N), fill, dtype=dt)
    rm = torch.zeros(B, M, dtype=torch.bool)
    cm = torch.zeros(B, N, dtype=torch.bool)
    for i, (c, ai, bi) in enumerate(problems):
        m, n = c.shape
        cost[i, :m, :n], a[i, :m], b[i, :n] = c, ai, bi
        rm[i, :m], cm[i, :n] = True, True
    return cost, a, b, rm, cm


# ------------------------------------------------------------------------------------ sinkhorn
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_marginals_met_when_converged(dtype):
    probs = [_problem(40, 5, s, dtype) for s in range(3)]
    cost, a, b = (torch.stack(t) for t in zip(*probs))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    plan = sinkhorn(cost, a * 3.0, b, eps=0.1, iters=2000, tol=tol)  # a is renormalised
    assert plan.dtype == dtype
    assert (plan.sum(2) - a).abs().max() < 1e-6
    assert (plan.sum(1) - b).abs().max() < 1e-6
    assert (plan >= 0).all()


@needs_pot
@pytest.mark.parametrize("eps", [0.5, 0.1])
def test_sinkhorn_equals_pot_sinkhorn(eps):
    cost, a, b = _problem(30, 4, 1)
    ref = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), eps, numItermax=100000, stopThr=1e-15)
    plan = sinkhorn(cost[None], a[None], b[None], eps=eps, iters=5000, tol=1e-14)[0]
    np.testing.assert_allclose(plan.numpy(), ref, rtol=1e-6, atol=1e-12)
    # fp32 input: the same plan to 1e-6 of its largest entry
    plan32 = sinkhorn(cost[None].float(), a[None].float(), b[None].float(), eps=eps, iters=2000, tol=1e-8)[0]
    assert plan32.dtype == torch.float32
    assert np.abs(plan32.double().numpy() - ref).max() < 1e-6 * ref.max()


@needs_pot
def test_sinkhorn_small_eps_equals_pot_sinkhorn_log_where_the_kernel_underflows():
    cost, a, b = _problem(25, 3, 2)
    eps = 0.01  # exp(−2/0.01) = 0 in fp32: a scaling-domain solver breaks down there
    ref = ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), cost.numpy(), eps, numItermax=20000, stopThr=1e-14)
    assert np.abs(ref.sum(0) - b.numpy()).max() < 1e-12 and np.abs(ref.sum(1) - a.numpy()).max() < 1e-12
    plan = sinkhorn(cost[None], a[None], b[None], eps=eps, iters=20000, tol=1e-14)[0]
    np.testing.assert_allclose(plan.numpy(), ref, rtol=1e-6, atol=1e-12)
    c32, a32, b32 = cost[None].float(), a[None].float(), b[None].float()
    plan32 = sinkhorn(c32, a32, b32, eps=eps, iters=3000, tol=1e-6)[0]
    # fp32 rounds C/ε ≈ 200 to ~1e-5 absolute, so the plan is good to ~1e-5 relative, no better
    assert np.abs(plan32.double().numpy() - ref).max() < 5e-5 * ref.max()
    assert (plan32.sum(1) - a32[0]).abs().max() < 1e-6 and (plan32.sum(0) - b32[0]).abs().max() < 1e-6
    assert not torch.isfinite(sinkhorn_code(c32, a32, b32, eps=eps)).all()  # the code's solver: NaN


def test_sinkhorn_equals_scipy_minimisation_of_entropic_objective():
    """3×2: minimise <P,C> + ε Σ P(log P − 1) over the 2-dim affine set of plans with the marginals."""
    C = np.array([[0.1, 0.9], [0.5, 0.2], [0.7, 0.3]])
    a, b, eps = np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.6]), 0.2
    A = np.zeros((5, 6))
    for i in range(3):
        A[i, 2 * i:2 * i + 2] = 1
    for j in range(2):
        A[3 + j, j::2] = 1
    Z = scipy.linalg.null_space(A)
    P0, c = np.outer(a, b).ravel(), C.ravel()

    def obj(t):
        P = P0 + Z @ t
        return np.inf if (P <= 0).any() else c @ P + eps * (P * (np.log(P) - 1)).sum()

    def jac(t):
        return Z.T @ (c + eps * np.log(np.clip(P0 + Z @ t, 1e-300, None)))

    def hess(t):
        return Z.T @ (Z * (eps / (P0 + Z @ t))[:, None])

    res = scipy.optimize.minimize(obj, np.zeros(2), jac=jac, hess=hess, method="trust-exact",
                                  options={"gtol": 1e-14})
    ref = (P0 + Z @ res.x).reshape(3, 2)
    assert np.abs(jac(res.x)).max() < 1e-10
    t = lambda x: torch.tensor(x)[None]  # noqa: E731
    plan = sinkhorn(t(C), t(a), t(b), eps=eps, iters=500)[0].numpy()
    np.testing.assert_allclose(plan, ref, atol=1e-10)


@needs_pot
def test_sinkhorn_potentials_reproduce_plan_and_match_pot_up_to_a_shift():
    cost, a, b = _problem(12, 4, 3)
    eps = 0.1
    res = sinkhorn(cost[None], a[None], b[None], eps=eps, iters=3000, tol=1e-14, return_potentials=True)
    assert res.n_iter < 3000 and res.n_iter % 10 == 0
    rebuilt = ((res.f[0, :, None] + res.g[0, None, :] - cost) / eps).exp()
    np.testing.assert_allclose(rebuilt.numpy(), res.plan[0].numpy(), rtol=1e-12)
    _, log = ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), cost.numpy(), eps, numItermax=100000, stopThr=1e-15,
                                     log=True)
    f_ref, g_ref = eps * log["log_u"], eps * log["log_v"]
    shift = f_ref[0] - res.f[0, 0].item()
    np.testing.assert_allclose(res.f[0].numpy() + shift, f_ref, atol=1e-9)
    np.testing.assert_allclose(res.g[0].numpy() - shift, g_ref, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_masked_batch_equals_separate_calls(dtype):
    sizes = [(7, 3), (12, 5), (4, 2), (12, 1)]
    probs = [_problem(m, n, 10 + i, dtype) for i, (m, n) in enumerate(sizes)]
    cost, a, b, rm, cm = _pad(probs)
    for tol in (None, 1e-7):
        plan = sinkhorn(cost, a, b, eps=0.1, iters=300, tol=tol, row_mask=rm, col_mask=cm)
        assert torch.isfinite(plan).all()
        for i, (c, ai, bi) in enumerate(probs):
            m, n = c.shape
            one = sinkhorn(c[None], ai[None], bi[None], eps=0.1, iters=300, tol=tol)[0]
            np.testing.assert_allclose(plan[i, :m, :n].numpy(), one.numpy(), rtol=1e-6, atol=1e-9)
            assert (plan[i, m:] == 0).all() and (plan[i, :, n:] == 0).all()


def test_sinkhorn_degenerate_problems_give_zero_plans():
    cost = torch.rand(4, 5, 3)
    rm = torch.ones(4, 5, dtype=torch.bool)
    cm = torch.ones(4, 3, dtype=torch.bool)
    rm[0] = False  # no valid row
    cm[1] = False  # no valid column
    a = torch.rand(4, 5)
    a[2] = 0  # zero total mass
    a[3, 1] = 0  # one zero-mass row in a healthy problem
    res = sinkhorn(cost, a, None, eps=0.1, iters=200, row_mask=rm, col_mask=cm, return_potentials=True)
    assert torch.isfinite(res.plan).all()
    assert (res.plan[:3] == 0).all()
    assert (res.plan[3, 1] == 0).all() and res.f[3, 1] == float("-inf")
    assert (res.plan[3].sum(0) - 1 / 3).abs().max() < 1e-6


def test_sinkhorn_bf16_input_computed_in_fp32():
    cost, a, b = _problem(20, 4, 4, torch.float32)
    c16 = cost.bfloat16()
    plan = sinkhorn(c16[None], a[None], b[None], eps=0.1, iters=100)
    assert plan.dtype == torch.float32
    ref = sinkhorn(c16.float()[None], a[None], b[None], eps=0.1, iters=100)
    assert torch.equal(plan, ref)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(TokensegError, match="cost"):
        sinkhorn(torch.rand(3, 4), eps=0.1)
    with pytest.raises(TokensegError, match="row_mask"):
        sinkhorn(torch.rand(2, 3, 4), row_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TokensegError, match="eps"):
        sinkhorn(torch.rand(2, 3, 4), eps=0.0)


# ------------------------------------------------------------------------------------ sinkhorn_code
def _code_loop(costs, us, vs, eps, max_iter, thresh):
    """One call of the released POT code's ``Net.Sinkhorn`` on a stack of equal-size problems,
    written from its semantics (K = exp(−C/ε); r, c from ones; mean |Δr| over the whole stack)."""
    K = torch.exp(-costs / eps)
    r, c = torch.ones_like(us), torch.ones_like(vs)
    n = 0
    for _ in range(max_iter):
        r0 = r
        r = us / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = vs / torch.matmul(K.permute(0, 2, 1), r.unsqueeze(-1)).squeeze(-1)
        n += 1
        if (r - r0).abs().mean().item() < thresh:
            break
    return r.unsqueeze(-1) * c.unsqueeze(-2) * K, n


@pytest.mark.parametrize("thresh", [1e-2, 1e-4, 0.0])
def test_sinkhorn_code_equals_per_call_loop_with_shared_stop_per_group(thresh):
    # groups of equal-size problems, as one image's classes are one call in the code; groups differ in size
    spec = [(0, 30, 2), (0, 30, 2), (1, 17, 3), (2, 25, 2), (2, 25, 2), (2, 25, 2)]
    probs = []
    for i, (_, m, n) in enumerate(spec):
        cost, _, _ = _problem(m, n, 20 + i, torch.float32)
        probs.append((cost * 0.6, torch.full((m,), 1.0 / m), torch.full((n,), 1.0 / n)))
    cost, a, b, rm, cm = _pad(probs)
    groups = torch.tensor([g for g, _, _ in spec]) * 7  # any ids
    plan, n_iter = sinkhorn_code(cost, None, None, eps=0.1, max_iter=100, thresh=thresh, row_mask=rm,
                                 col_mask=cm, groups=groups, return_iters=True)
    for g in range(3):
        members = [i for i, s in enumerate(spec) if s[0] == g]
        ref, n_ref = _code_loop(*(torch.stack([probs[i][j] for i in members]) for j in range(3)), 0.1, 100, thresh)
        for k, i in enumerate(members):
            m, n = probs[i][0].shape
            np.testing.assert_allclose(plan[i, :m, :n].numpy(), ref[k].numpy(), rtol=2e-5, atol=1e-12)
            assert n_iter[i] == n_ref
            assert (plan[i, m:] == 0).all() and (plan[i, :, n:] == 0).all()
    if thresh == 1e-2:
        assert n_iter.max() < 100  # early stop exercised, at different iterations per group
        assert len(set(n_iter.tolist())) > 1
    if thresh == 0.0:
        assert (n_iter == 100).all()


def test_sinkhorn_code_default_groups_stop_each_problem_alone():
    probs = [_problem(20, 3, 30 + i, torch.float32) for i in range(3)]
    cost, a, b = (torch.stack(t) for t in zip(*probs))
    plan, n_iter = sinkhorn_code(cost, a, b, eps=0.1, thresh=1e-3, return_iters=True, check_every=1)
    for i in range(3):
        ref, n_ref = _code_loop(cost[i:i + 1], a[i:i + 1], b[i:i + 1], 0.1, 100, 1e-3)
        np.testing.assert_allclose(plan[i].numpy(), ref[0].numpy(), rtol=2e-5)
        assert n_iter[i] == n_ref


# ------------------------------------------------------------------------------------ k-means
def _blobs(G, N, D, k, seed, spread=0.15):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(G, k, D))
    lab = rng.integers(0, k, size=(G, N))
    x = np.take_along_axis(centres, lab[:, :, None], 1) + spread * rng.normal(size=(G, N, D))
    return torch.tensor(x)


def _same_partition(p, q):
    """Equal up to relabelling: the contingency table is a one-to-one matching."""
    p, q = np.asarray(p), np.asarray(q)
    pairs = set(zip(p.tolist(), q.tolist()))
    return len(pairs) == len(set(p.tolist())) == len(set(q.tolist()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kmeans_euclidean_equals_sklearn_lloyd(dtype):
    from sklearn.cluster import KMeans

    G, N, D, k = 3, 60, 5, 3
    x = _blobs(G, N, D, 4, seed=0, spread=0.6).to(dtype)  # 4 blobs into 3 clusters: Lloyd has work to do
    n_valid = [60, 41, 23]
    mask = torch.arange(N)[None] < torch.tensor(n_valid)[:, None]
    x[~mask] = 1e6  # garbage a correct mask never reads
    init = torch.stack([x[g, [0, 1, 2]] for g in range(G)])
    res = kmeans(x, k, mask=mask, init=init, distance="euclidean", iters=300, tol=1e-30)  # to the fixed point
    for g in range(G):
        xv = x[g, :n_valid[g]].double().numpy()
        sk = KMeans(n_clusters=k, init=init[g].double().numpy(), n_init=1, algorithm="lloyd", max_iter=300,
                    tol=0.0).fit(xv)
        ours = res.labels[g, :n_valid[g]].numpy()
        assert _same_partition(ours, sk.labels_)
        assert (res.labels[g, n_valid[g]:] == -1).all()
        np.testing.assert_allclose(res.centroids[g].double().numpy(), sk.cluster_centers_,
                                   atol=1e-9 if dtype == torch.float64 else 1e-5)
        np.testing.assert_array_equal(res.counts[g].numpy(), np.bincount(sk.labels_, minlength=k))


def _kmeans_pytorch_loop(X, init, tol):
    """kmeans_pytorch 0.3's loop, written from its semantics: argmin of 1 − cos, centroid = mean of the
    assigned raw points, stop after the update when (Σ_k ‖Δc_k‖)² < tol; returns that last assignment."""
    state = init.clone()
    it = 0
    while True:
        cos = (X / X.norm(dim=1, keepdim=True)) @ (state / state.norm(dim=1, keepdim=True)).T
        lab = torch.argmin(1 - cos, dim=1)
        prev = state.clone()
        for j in range(len(state)):
            state[j] = X[lab == j].mean(0)
        it += 1
        if torch.sqrt(((state - prev) ** 2).sum(1)).sum() ** 2 < tol or it > 500:
            return lab, state, it


def test_kmeans_cosine_equals_per_group_loop():
    G, N, D, k = 4, 80, 16, 3
    x = _blobs(G, N, D, 3, seed=1, spread=0.5).float() + 0.3  # not centred: cosine ≠ euclidean
    n_valid = [80, 55, 31, 64]
    mask = torch.arange(N)[None] < torch.tensor(n_valid)[:, None]
    init = kmeans_pytorch_init(x, k, mask, rng=np.random.RandomState(3))
    res = kmeans(x, k, mask=mask, init=init, distance="cosine", iters=200, tol=1e-4)
    iters = []
    for g in range(G):
        lab, cent, it = _kmeans_pytorch_loop(x[g, :n_valid[g]], init[g], 1e-4)
        iters.append(it)
        np.testing.assert_array_equal(res.labels[g, :n_valid[g]].numpy(), lab.numpy())
        np.testing.assert_allclose(res.centroids[g].numpy(), cent.numpy(), atol=1e-5)
    assert len(set(iters)) > 1  # groups stopped at different iterations and were frozen independently
    # checking every iteration shrinks the batch to the running groups as they stop; never checking
    # (until the cap) runs every group to the end, frozen: the same result
    late = kmeans(x, k, mask=mask, init=init, distance="cosine", iters=200, tol=1e-4, check_every=500)
    assert torch.equal(late.labels, res.labels) and torch.equal(late.centroids, res.centroids)


def test_kmeans_pytorch_init_draws_like_the_library():
    x = torch.randn(3, 10, 4)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False  # 2 < k valid points: skipped, no draw (the POT code's `continue`)
    init = kmeans_pytorch_init(x, 3, mask, rng=np.random.RandomState(7))
    rs = np.random.RandomState(7)
    np.testing.assert_array_equal(init[0].numpy(), x[0, rs.choice(10, 3, replace=False)].numpy())
    np.testing.assert_array_equal(init[1].numpy(), x[1, rs.choice(5, 3, replace=False)].numpy())
    assert (init[2] == 0).all()


def test_kmeans_equals_kmeans_pytorch_library():
    kp = pytest.importorskip("kmeans_pytorch")
    G, N, D, k = 3, 50, 8, 2
    x = _blobs(G, N, D, 2, seed=2, spread=0.4).float() + 0.2
    np.random.seed(11)
    ref = [kp.kmeans(X=x[g], num_clusters=k, distance="cosine") for g in range(G)]
    init = kmeans_pytorch_init(x, k, rng=np.random.RandomState(11))
    np.random.seed(11)
    res = kmeans(x, k, init=init, distance="cosine", iters=500)
    for g in range(G):
        np.testing.assert_array_equal(res.labels[g].numpy(), ref[g][0].numpy())
        np.testing.assert_allclose(res.centroids[g].numpy(), ref[g][1].numpy(), atol=1e-5)


def test_kmeans_small_and_empty_groups_and_empty_clusters():
    x = torch.randn(3, 6, 4)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0] = True
    mask[1, [1, 4]] = True  # 2 < k = 3 valid points
    gen = torch.Generator().manual_seed(0)
    res = kmeans(x, 3, mask=mask, generator=gen)  # group 2 has no valid point
    assert torch.isfinite(res.centroids).all()
    assert (res.labels[2] == -1).all() and (res.counts[2] == 0).all() and (res.centroids[2] == 0).all()
    lab1 = res.labels[1, [1, 4]]
    assert sorted(lab1.tolist()) == [0, 1] and (res.labels[1, mask[1].logical_not()] == -1).all()
    assert res.counts[1].tolist() == [1, 1, 0] and (res.centroids[1, 2] == 0).all()
    for j, i in zip(lab1.tolist(), [1, 4]):  # each point is its own cluster
        assert torch.equal(res.centroids[1, j], x[1, i])
    assert res.counts[0].sum() == 6

    # an empty cluster keeps its centroid [I]
    pts = torch.tensor([[[1.0, 0.0], [1.1, 0.1], [0.0, 1.0], [0.1, 1.1]]])
    init = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [50.0, 50.0]]])
    res = kmeans(pts, 3, init=init, distance="euclidean", iters=10)
    assert res.counts.tolist() == [[2, 2, 0]]
    assert torch.equal(res.centroids[0, 2], init[0, 2])
    torch.testing.assert_close(res.centroids[0, :2], torch.tensor([[1.05, 0.05], [0.05, 1.05]]))


@pytest.mark.parametrize("compact", [True, False])
def test_kmeans_random_init_is_deterministic_and_reads_only_valid_points(compact):
    x = _blobs(5, 40, 6, 3, seed=4).float()
    mask = torch.rand(5, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    x[~mask] = float("nan")  # padding may hold anything
    x[~mask & (torch.arange(40) % 2 == 0)] = 1e4
    runs = [kmeans(x, 3, mask=mask, generator=torch.Generator().manual_seed(5), compact=compact) for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(runs[0], runs[1]))
    assert torch.isfinite(runs[0].centroids).all() and runs[0].centroids.abs().max() < 100
    assert (runs[0].labels[~mask] == -1).all() and (runs[0].labels[mask] >= 0).all()
    assert torch.equal(runs[0].counts.sum(1), mask.sum(1))
    # bf16 input is accepted and computed in fp32
    r16 = kmeans(x.bfloat16(), 3, mask=mask, generator=torch.Generator().manual_seed(5), compact=compact)
    assert r16.centroids.dtype == torch.float32 and torch.isfinite(r16.centroids).all()


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_kmeans_compaction_and_x_index_change_nothing(distance):
    feats = _blobs(2, 50, 6, 3, seed=6).float()  # 2 images
    img = torch.tensor([0, 0, 1, 1, 1])  # 5 groups = (image, class)
    frac = torch.tensor([0.2, 0.5, 0.1, 0.9, 0.0])[:, None]  # the last group has no valid point
    mask = torch.rand(5, 50, generator=torch.Generator().manual_seed(2)) < frac
    runs = []
    for compact in (True, False):
        for use_index in (True, False):
            x = feats if use_index else feats[img]
            runs.append(kmeans(x, 3, mask=mask, distance=distance, x_index=img if use_index else None,
                               compact=compact, generator=torch.Generator().manual_seed(9), tol=None, iters=30))
    for r in runs[1:]:
        assert torch.equal(r.labels, runs[0].labels) and torch.equal(r.counts, runs[0].counts)
        torch.testing.assert_close(r.centroids, runs[0].centroids, rtol=1e-6, atol=1e-6)
    assert (runs[0].labels[~mask] == -1).all() and torch.equal(runs[0].counts.sum(1), mask.sum(1))


def test_kmeans_rejects_bad_input():
    with pytest.raises(TokensegError, match="distance"):
        kmeans(torch.randn(1, 5, 2), 2, distance="manhattan")
    with pytest.raises(TokensegError, match="init"):
        kmeans(torch.randn(1, 5, 2), 2, init=torch.randn(1, 3, 2))


# ------------------------------------------------------------------------------------ helpers
def test_topk_per_column_by_hand():
    plan = torch.tensor([[[0.10, 0.00],
                          [0.30, 0.05],
                          [0.20, 0.40],
                          [0.90, 0.01]]])  # row 3 is padding (masked) despite its large mass
    rm = torch.tensor([[True, True, True, False]])
    idx, ok = topk_per_column(plan, 2, row_mask=rm)
    assert idx.tolist() == [[[1, 2], [2, 1]]]
    assert ok.all()
    idx, ok = topk_per_column(plan, 4, row_mask=rm, col_mask=torch.tensor([[True, False]]))
    assert idx[0, 0, :3].tolist() == [1, 2, 0]
    assert ok.tolist() == [[[True, True, True, False], [False] * 4]]
    feats = torch.arange(8.0).view(1, 4, 2)
    got = gather_rows(feats, idx[:, :, :2])
    assert got.tolist() == [[[[2.0, 3.0], [4.0, 5.0]], [[4.0, 5.0], [2.0, 3.0]]]]
