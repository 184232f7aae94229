"""Fully connected CRF (DenseCRF, Krähenbühl & Koltun 2011) with the papers' parameter sets.

Two backends compute the same model: Potts compatibility, a spatial Gaussian kernel and a bilateral
(position + colour) kernel, symmetric kernel normalisation, unary ``-log p``, mean-field inference:

    Q ← softmax(−U + Σ_m w_m · n_m ⊙ K_m (n_m ⊙ Q)),   n_m = 1 / sqrt(K_m 1)

* ``pydensecrf``: the ``pydensecrf2`` package, a default dependency of tokenseg (built from source at
  install time), permutohedral lattice, fast on any image size. What the authors use, and the default.
* ``torch``: pure torch, the fallback where pydensecrf2 cannot be built. It computes the model with the
  true Gaussian kernels, which the lattice only approximates, so even its exact path does not agree
  with pydensecrf2 on every pixel (measured on real photos in the README, ``benchmarks/bench_crf.py``).
  The Gaussian kernel is separable and applied exactly.
  The bilateral kernel is computed exactly with explicit N×N pairwise weights (in row chunks) when the
  image has at most ``exact_pixels`` pixels. Larger images are approximated: the bilateral message is
  computed on an area-downsampled grid (each coarse pixel carries its mean colour and its pixel count,
  so the sums still approximate the full-resolution sums). Each full-resolution pixel then receives
  from the coarse senders directly where that fits in memory, else the message is computed on the
  coarse grid and brought back by joint bilateral upsampling (3×3 coarse neighbours weighted by
  distance and colour). Unaries and the Gaussian message stay at full resolution.

``backend="auto"`` uses pydensecrf when it is importable, otherwise torch. The torch path costs about
``pixels × min(pixels, exact_pixels)`` kernel entries, so it is much slower than the lattice on small
images too.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TokensegError

INSTALL_HINT = "pip install pydensecrf2  (a tokenseg dependency; it builds from source with a C++ compiler)"


@dataclass(frozen=True)
class CRFParams:
    iters: int = 10
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bi_sxy: float = 80.0
    bi_srgb: float = 13.0
    bi_compat: float = 10.0


CRF_PRESETS: dict[str, CRFParams] = {
    # PSA / MCTformer pseudo labels (psa/tool/imutils.crf_inference)
    "psa": CRFParams(10, 3.0, 3.0, 80.0, 13.0, 10.0),
    # MCTformer segmentation inference (seg/tool)
    "mctformer-seg": CRFParams(10, 4.0, 3.0, 83.0, 5.0, 3.0),
    # CLIP-ES pseudo masks (METHODS.md §10.6)
    "clip-es": CRFParams(10, 1.0, 3.0, 67.0, 3.0, 4.0),
    # IRN / POT IR labels (misc/imutils.crf_inference_label, on label unaries; METHODS.md §7.2)
    "irn": CRFParams(10, 3.0, 3.0, 50.0, 5.0, 10.0),
}


def crf_params(preset: str, iters: int = -1, gauss_sxy: float = -1, gauss_compat: float = -1,
               bi_sxy: float = -1, bi_srgb: float = -1, bi_compat: float = -1) -> CRFParams:
    """A preset with the given non-negative values overriding it."""
    if preset not in CRF_PRESETS:
        raise TokensegError(f"unknown CRF preset {preset!r}; presets: {', '.join(CRF_PRESETS)}")
    base = CRF_PRESETS[preset]
    changes = {k: v for k, v in dict(iters=iters, gauss_sxy=gauss_sxy, gauss_compat=gauss_compat,
                                      bi_sxy=bi_sxy, bi_srgb=bi_srgb, bi_compat=bi_compat).items() if v >= 0}
    if "iters" in changes:
        changes["iters"] = int(changes["iters"])
    return replace(base, **changes)


def crf_params_from_config(pc) -> CRFParams:
    """The CRF parameters of a :class:`~tokenseg.config.PseudoConfig`."""
    return crf_params(pc.crf_preset, pc.crf_iters, pc.crf_gauss_sxy, pc.crf_gauss_compat,
                      pc.crf_bi_sxy, pc.crf_bi_srgb, pc.crf_bi_compat)


def pydensecrf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        if pydensecrf_available():
            return "pydensecrf"
        warnings.warn(f"pydensecrf2 is not importable: the DenseCRF falls back to the pure-torch backend, slower and "
                      f"not the authors' lattice (README: DenseCRF). Install it with: {INSTALL_HINT}", stacklevel=2)
        return "torch"
    if backend == "pydensecrf":
        if not pydensecrf_available():
            raise TokensegError(
                f"crf_backend=pydensecrf but pydensecrf is not installed. Install it with: {INSTALL_HINT}; "
                "or set crf_backend=torch (pure-torch fallback, exact on small images)")
        return backend
    if backend == "torch":
        return backend
    raise TokensegError(f"unknown CRF backend {backend!r}; use auto, pydensecrf or torch")


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None, backend: str = "auto",
              exact_pixels: int = 4096) -> np.ndarray:
    """Refine (L, H, W) class probabilities with a DenseCRF on an (H, W, 3) uint8 RGB image.

    ``probs`` need not sum to one (only ``-log p`` differences per pixel matter); they are clipped
    at 1e-5. Returns the (L, H, W) float32 mean-field marginals."""
    params = params or CRF_PRESETS["psa"]
    image = np.ascontiguousarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("image must be (H, W, 3) uint8")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs {probs.shape} must be (L, H, W) with H, W of the image {image.shape[:2]}")
    if probs.shape[0] == 1:
        return np.ones_like(probs)
    if resolve_backend(backend) == "pydensecrf":
        return _crf_pydensecrf(image, probs, params)
    return crf_torch(image, probs, params, exact_pixels=exact_pixels)


def unary_from_probs(probs: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probs, 1e-5, None)).astype(np.float32)


def label_probs(labels: np.ndarray, n_labels: int, gt_prob: float = 0.7) -> np.ndarray:
    """(n_labels, H, W) probabilities of a hard (H, W) label map: ``gt_prob`` for the label, the rest
    shared equally by the others. ``-log`` of it is pydensecrf's ``unary_from_labels(labels, n_labels,
    gt_prob, zero_unsure=False)``, the unary of IRN's label CRF."""
    if not 0.0 < gt_prob < 1.0:
        raise TokensegError(f"gt_prob must be in (0, 1), got {gt_prob}")
    labels = np.asarray(labels, dtype=np.int64)
    other = (1.0 - gt_prob) / max(n_labels - 1, 1)
    probs = np.full((n_labels,) + labels.shape, other, dtype=np.float32)
    np.put_along_axis(probs, labels[None], np.float32(gt_prob), axis=0)
    return probs


def crf_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, params: CRFParams | None = None,
               gt_prob: float = 0.7, backend: str = "auto", exact_pixels: int = 4096) -> np.ndarray:
    """DenseCRF on a hard label map (IRN's ``crf_inference_label``): (H, W) int labels in
    ``[0, n_labels)`` → the (H, W) argmax of the CRF marginals."""
    if n_labels < 2:
        return np.zeros(np.shape(labels), dtype=np.int64)
    q = dense_crf(image, label_probs(labels, n_labels, gt_prob), params or CRF_PRESETS["irn"], backend, exact_pixels)
    return q.argmax(0)


def _crf_pydensecrf(image: np.ndarray, probs: np.ndarray, p: CRFParams) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    L, H, W = probs.shape
    crf = dcrf.DenseCRF2D(W, H, L)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_probs(probs).reshape(L, -1)))
    crf.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
    rgb = np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])  # pydensecrf wants a writable buffer
    crf.addPairwiseBilateral(sxy=p.bi_sxy, srgb=p.bi_srgb, rgbim=rgb, compat=p.bi_compat)
    q = crf.inference(p.iters)
    return np.asarray(q, dtype=np.float32).reshape(L, H, W)


# ----------------------------------------------------------------------------- torch backend
def _gauss_1d(n: int, s: float, dtype=torch.float32) -> torch.Tensor:
    r = torch.arange(n, dtype=dtype)
    return torch.exp(-0.5 * ((r[:, None] - r[None, :]) / s) ** 2)


def _separable_gauss(q: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
    """Σ_j exp(-|p_i - p_j|²/2s²) q_j for (L, H, W) q, exact (the spatial kernel is separable)."""
    return torch.matmul(torch.matmul(ky, q), kx)


def _pair_kernel(fr: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
    """exp(-½‖f_r − f_s‖²) for receivers (R, d) × senders (S, d)."""
    d2 = (fr * fr).sum(1)[:, None] + (fs * fs).sum(1)[None, :] - 2.0 * (fr @ fs.T)
    return torch.exp(-0.5 * d2.clamp_min_(0))


class _DenseKernel:
    """Explicit kernel between R receivers and S senders, stored when R·S fits ``budget`` entries,
    else recomputed in row chunks on every application; ``weights`` (S,) scales the senders."""

    def __init__(self, fr: torch.Tensor, fs: torch.Tensor, weights: torch.Tensor | None = None,
                 budget: int = 1 << 25) -> None:
        self.fr, self.fs, self.w = fr, fs, weights
        self.chunk = max(1, budget // max(fs.shape[0], 1))
        self.full = self._block(0, fr.shape[0]) if fr.shape[0] * fs.shape[0] <= budget else None

    def _block(self, a: int, b: int) -> torch.Tensor:
        k = _pair_kernel(self.fr[a:b], self.fs)
        return k * self.w[None, :] if self.w is not None else k

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """K @ v for v (S, L) -> (R, L)."""
        if self.full is not None:
            return self.full @ v
        n = self.fr.shape[0]
        return torch.cat([self._block(a, min(a + self.chunk, n)) @ v for a in range(0, n, self.chunk)])


class _JointUpsampler:
    """Edge-aware upsampling of coarse-grid messages: pixel ``i`` averages the messages of the 3×3
    coarse cells around its own, weighted by exp(−|p_i − p_J|²/2f² − |I_i − I_J|²/2σ_rgb²) (joint
    bilateral upsampling), so a message does not bleed across a colour edge inside a coarse cell."""

    def __init__(self, img: torch.Tensor, coarse_rgb: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor,
                 factor: int, srgb: float) -> None:
        _, H, W = img.shape
        h2, w2 = cy.shape
        ys = torch.arange(H)
        xs = torch.arange(W)
        by = (ys // factor)[:, None].expand(H, W)
        bx = (xs // factor)[None, :].expand(H, W)
        self.index, weights = [], []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                jy, jx = by + dy, bx + dx
                valid = (jy >= 0) & (jy < h2) & (jx >= 0) & (jx < w2)
                jy, jx = jy.clamp(0, h2 - 1), jx.clamp(0, w2 - 1)
                d2 = (ys[:, None] - cy[jy, jx]) ** 2 + (xs[None, :] - cx[jy, jx]) ** 2
                c2 = ((img - coarse_rgb[:, jy, jx]) ** 2).sum(0)
                wgt = torch.exp(-0.5 * d2 / factor ** 2 - 0.5 * c2 / srgb ** 2) * valid
                self.index.append((jy, jx))
                weights.append(wgt)
        total = torch.stack(weights).sum(0).clamp_min(1e-30)
        self.weights = [w_ / total for w_ in weights]

    def __call__(self, m: torch.Tensor) -> torch.Tensor:  # (L, h2, w2) -> (L, H, W)
        out = None
        for (jy, jx), wgt in zip(self.index, self.weights):
            term = m[:, jy, jx] * wgt
            out = term if out is None else out + term
        return out


KERNEL_BUDGET = 1 << 25  # entries of a stored kernel (128 MiB in float32)


def crf_torch(image: np.ndarray, probs: np.ndarray, p: CRFParams, exact_pixels: int = 4096,
              device: torch.device | str = "cpu") -> np.ndarray:
    """Pure-torch mean-field DenseCRF (see the module docstring for exactness), computed on ``device``."""
    with torch.device(device):  # every tensor made below lives on ``device``
        return _crf_torch(image, probs, p, exact_pixels, torch.device(device))


def _crf_torch(image: np.ndarray, probs: np.ndarray, p: CRFParams, exact_pixels: int,
               device: torch.device) -> np.ndarray:
    L, H, W = probs.shape
    img = torch.from_numpy(np.asarray(image, dtype=np.float32)).to(device).permute(2, 0, 1)  # (3, H, W)
    unary = torch.from_numpy(unary_from_probs(probs)).to(device)  # (L, H, W)

    ky, kx = _gauss_1d(H, p.gauss_sxy), _gauss_1d(W, p.gauss_sxy)
    g_norm = _separable_gauss(torch.ones(1, H, W), ky, kx)[0].rsqrt()  # (H, W)

    def features(ys: torch.Tensor, xs: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1) / p.bi_sxy
        return torch.cat([pos, col.reshape(3, -1).T / p.bi_srgb], 1)

    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    f_full = features(ys, xs, img)
    factor = 1 if H * W <= exact_pixels else math.ceil(math.sqrt(H * W / exact_pixels))
    if factor == 1:  # exact: every pixel sends and receives
        count = None
        senders = receivers = _DenseKernel(f_full, f_full, None, KERNEL_BUDGET)
        full_receivers = True
    else:  # senders on an area-downsampled grid, weighted by their pixel counts
        def pool(t: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(t[None], factor, ceil_mode=True, divisor_override=1)[0]

        count = pool(torch.ones(1, H, W))[0]
        ys2, xs2 = pool(ys[None])[0] / count, pool(xs[None])[0] / count
        f_coarse = features(ys2, xs2, pool(img) / count)
        w = count.reshape(-1)
        senders = _DenseKernel(f_coarse, f_coarse, w, KERNEL_BUDGET)
        full_receivers = f_full.shape[0] * f_coarse.shape[0] <= KERNEL_BUDGET
        receivers = _DenseKernel(f_full, f_coarse, w, KERNEL_BUDGET) if full_receivers else senders
        if not full_receivers:
            upsample = _JointUpsampler(img, pool(img) / count, ys2, xs2, factor, p.bi_srgb)
    s_norm = senders.apply(torch.ones(senders.fs.shape[0], 1)).clamp_min(1e-20).rsqrt()  # (S, 1)
    if receivers is senders:
        r_norm = s_norm
    else:
        r_norm = receivers.apply(torch.ones(receivers.fs.shape[0], 1)).clamp_min(1e-20).rsqrt()

    def down(q: torch.Tensor) -> torch.Tensor:  # (L, H, W) -> (S, L) mean over each coarse cell
        if factor == 1:
            return q.reshape(L, -1).T
        s = F.avg_pool2d(q[None], factor, ceil_mode=True, divisor_override=1)[0] / count
        return s.reshape(L, -1).T

    def to_image(m: torch.Tensor) -> torch.Tensor:  # (R, L) -> (L, H, W)
        if full_receivers:
            return m.T.reshape(L, H, W)
        return upsample(m.T.reshape(L, *count.shape))

    q = torch.softmax(-unary, dim=0)
    for _ in range(p.iters):
        msg = p.gauss_compat * g_norm * _separable_gauss(q * g_norm, ky, kx)
        msg = msg + p.bi_compat * to_image(r_norm * receivers.apply(s_norm * down(q)))
        q = torch.softmax(-unary + msg, dim=0)
    return q.cpu().numpy().astype(np.float32)
