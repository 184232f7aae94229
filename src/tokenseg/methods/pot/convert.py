"""The released POT code's checkpoints, both ways."""
from __future__ import annotations


import torch
import torch.nn as nn

from .train import build


def load_foreign(state, source: str, overrides=(), num_heads=None, path=None):
    """The released code's checkpoints (``{'net': state_dict}`` of ``resnet50_POT.Net``): ``resnet50.*``
    backbone, ``side1..4``, ``classifier``; ``f9`` (unused by their forward) and the aliases
    ``stage*`` / ``backbone.*`` / ``newly_added.*`` of the same modules are dropped. Built as
    ``pot-clip-es`` in code mode (their network is trained with CLIP-ES)."""
    from ...core.weights import load_state_checked
    from ...config import load_config
    from ...models.layout import resolve_class_names

    sd = state.get("net", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        return None
    sd = {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}
    if not all(k in sd for k in ("resnet50.conv1.weight", "side1.weight", "classifier.weight")):
        return None
    C = int(sd["classifier.weight"].shape[0])
    cfg = load_config("pot-clip-es", ["pot.mode=code", "model.pretrained=false", "pot.backbone=resnet50",
                                      *overrides])
    cfg.name, cfg.output_dir = "converted-pot", "runs/converted-pot"
    model = build(cfg, C)
    ours = {"body." + k.removeprefix("resnet50."): v for k, v in sd.items() if k.startswith("resnet50.")}
    ours.update({k: v for k, v in sd.items() if k.startswith(("side", "classifier."))})
    load_state_checked(model, ours, source)
    model.class_names_source = "default"
    return model.eval(), cfg, resolve_class_names(None, C)


def to_released_state(model: nn.Module) -> dict:
    """Our POT model as the released code's ``Net`` state dict (what their ``make_cam.py`` loads with
    ``strict=True``): ``resnet50.*`` and its aliases ``stage0..4.*`` / ``backbone.0..4.*``, the side
    convs and classifier, their unused ``f9`` (zeros) and the ``newly_added.*`` aliases. For ``tokenseg
    convert``; only a ResNet-50 at output stride 16 fits their network."""
    sd = model.state_dict()
    body = {k.removeprefix("body."): v for k, v in sd.items() if k.startswith("body.")}
    out = {f"resnet50.{k}": v for k, v in body.items()}
    stem = {"conv1": "0", "bn1": "1"}
    for k, v in body.items():
        head, rest = k.split(".", 1)
        if head in stem:
            alias = f"0.{stem[head]}.{rest}"
        elif head.startswith("layer"):
            alias = f"{head[5:]}.0.{rest}"
        else:
            continue
        i, tail = alias.split(".", 1)
        out[f"stage{i}.{tail}"] = v
        out[f"backbone.{i}.{tail}"] = v
    f9 = torch.zeros(2048, 2 + 3 + 2048, 1, 1, dtype=sd["classifier.weight"].dtype)
    new = [("classifier", sd["classifier.weight"]), ("f9", f9)] + [(f"side{j}", sd[f"side{j}.weight"])
                                                                   for j in range(1, 5)]
    for j, (name, w) in enumerate(new):
        out[f"{name}.weight"] = w
        out[f"newly_added.{j}.weight"] = w
    return out
