"""Model pieces against independent references."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokenseg.config import ModelConfig
from tokenseg.core.losses import contrastive_class_token_loss
from tokenseg.methods.mctformer.model import build_model
from tokenseg.models import gwrp, resize_pos_grid
from tokenseg.models import attention as classtoken  # the attention helpers moved out of classtoken.py


def tiny_model(method="mctformer-plus", C=3, depth=3, **kw):
    cfg = ModelConfig(method=method, backbone="vit_tiny_patch16_224",
                      backbone_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": depth,
                                       "num_heads": 2}, img_size=32, drop_path=0.0, **kw)
    torch.manual_seed(0)
    return build_model(cfg, C).eval()


def test_gwrp_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17)
    lam = 0.9
    out = gwrp(x, lam)
    for b in range(2):
        for c in range(3):
            r = sorted(x[b, c].tolist(), reverse=True)
            num = sum(lam ** j * v for j, v in enumerate(r))
            den = sum(lam ** j for j in range(len(r)))
            assert out[b, c].item() == pytest.approx(num / den, rel=1e-5)
    # decay 1 is global average pooling
    assert torch.allclose(gwrp(x, 1.0), x.mean(-1), atol=1e-6)


def test_cct_loss_brute_force_and_masking():
    torch.manual_seed(0)
    B, C, D, L = 2, 4, 5, 3
    layers = [torch.randn(B, C, D) for _ in range(L)]
    y = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    got = contrastive_class_token_loss(layers, y)
    total = 0.0
    for b in range(B):
        acc = 0.0
        for c in range(C):
            if y[b, c] == 0:
                continue
            for t in layers:
                v = t[b] / t[b].norm(dim=-1, keepdim=True)
                sims = [float(v[c] @ v[j]) for j in range(C)]
                acc += (-sims[c] + math.log(sum(math.exp(s) for s in sims))) / L
        total += acc / y[b].sum().item()
    assert got.item() == pytest.approx(total / B, rel=1e-5)
    # the loss depends on cosine similarities only
    changed = [t.clone() for t in layers]
    for t in changed:
        t[1, 0] = t[1, 0] * 3  # scaling a token does not change cosine similarities
    assert contrastive_class_token_loss(changed, y).item() == pytest.approx(got.item(), rel=1e-5)


def test_pos_embed_interpolation_is_identity_at_training_size():
    pos = torch.randn(1, 8, 4, 4)
    assert torch.equal(resize_pos_grid(pos, (4, 4)), pos)
    # the integer 2x case copies each embedding 2x2 (MCTformer+ 224 -> 448)
    up = resize_pos_grid(pos, (8, 8))
    assert torch.equal(up[..., ::2, ::2], pos) and torch.equal(up[..., 1::2, 1::2], pos)
    m = tiny_model()
    x = torch.randn(1, 3, 32, 32)
    tokens, grid = m.embed(x)
    patches = m.patch_embed.norm(m.patch_embed.proj(x).flatten(2).transpose(1, 2))
    expect = patches + m.pos_embed_pat.flatten(2).transpose(1, 2)
    assert grid == (4, 4)
    assert torch.allclose(tokens[:, 3:], expect, atol=1e-6)


def naive_attention_stack(model, x):
    """Reference: explicit attention in every layer, stacked (L, B, H, N, N), timm block outputs."""
    tokens, grid = model.embed(x)
    attns = []
    for blk in model.blocks:
        a = blk.attn
        h = blk.norm1(tokens)
        B, N, _ = h.shape
        qkv = a.qkv(h).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        p = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        attns.append(p)
        tokens = blk(tokens)  # timm's own forward (fused attention) for the token path
    return torch.stack(attns), model.output_norm(tokens), grid  # no final norm, as the authors


@pytest.mark.parametrize("affinity", [True, False])
def test_attention_reduction_matches_stacked_reference(affinity):
    m = tiny_model(C=3, depth=4)
    x = torch.randn(2, 3, 40, 32)
    stack, tokens, grid = naive_attention_stack(m, x)
    C, K = 3, 2
    out = m.forward_maps(x, last_k=K, affinity=affinity, layer_reduce="mean")
    head_mean = stack.mean(2)  # (L, B, N, N)
    c2p = head_mean[-K:, :, :C, C:].mean(0).reshape(2, C, *grid)
    assert torch.allclose(out.attention, c2p, atol=1e-5)
    if affinity:
        p2p = head_mean[:, :, C:, C:].sum(0)
        assert torch.allclose(out.affinity, p2p, atol=1e-5)
    else:
        assert out.affinity is None
    pat = tokens[:, C:].transpose(1, 2).reshape(2, -1, *grid)
    assert torch.allclose(out.patchcam, F.relu(m.head(pat)), atol=1e-5)
    train_out = m(x)
    assert torch.allclose(out.cls_logits, train_out["cls_logits"], atol=1e-5)


@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_attention_matches_whole_product(monkeypatch, dtype, blocked):
    """The CPU path works on blocks of query rows, head by head (N = 37 rows in blocks of 8 leaves a
    ragged last block); the GPU path in one product."""
    monkeypatch.setattr(classtoken, "_CPU_BLOCK_FLOATS", 8 * 37)
    torch.manual_seed(0)
    B, H, N, d = 2, 3, 37, 16
    q, k, v = (torch.randn(B, H, N, d).to(dtype).float() for _ in range(3))
    q = q * d ** -0.5  # callers pass q already scaled
    probs = (q @ k.transpose(-2, -1)).softmax(-1)  # fp32 reference on the same (rounded) inputs
    ref_out = (probs @ v).transpose(1, 2).reshape(B, N, H * d)
    out, head_mean = classtoken.explicit_attention(q.to(dtype), k.to(dtype), v.to(dtype), blocked)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and head_mean.dtype == torch.float32
    assert torch.allclose(out.float(), ref_out, atol=tol)
    assert torch.allclose(head_mean, probs.mean(1), atol=tol / 10)
    assert torch.allclose(head_mean.sum(-1), torch.ones(B, N), atol=tol)


def test_v1_has_no_patch_head_and_distinct_tokens_from_scratch():
    m = tiny_model(method="mctformer-v1")
    assert m.head is None
    out = m(torch.randn(2, 3, 32, 32))
    assert set(out) - {"tokens", "grid"} == {"cls_logits"}  # no PatchCAM outputs
    # from scratch the class tokens are independent draws (identical copies would never separate)
    assert not torch.allclose(m.cls_tokens[0, 0], m.cls_tokens[0, 1])
