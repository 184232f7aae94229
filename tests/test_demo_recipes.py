"""The demo recipes' support: the synthetic generator's object-scale knob and benchmarks/bench_demos.py."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tokenseg.config import SyntheticConfig
from tokenseg.data.synthetic import default_root, render_image

# sha256 of the (image, mask) bytes of the 6 renders below, and the cache folder names of two configs, as
# the generator gave them before `object_scale` existed (git 30bcad3, src/tokenseg/data/synthetic.py)
OLD_DIGEST = "cc250d1b8f0452ef6c469418fe90e772eabb8f08baf3b93e633260d5e8421ed8"
OLD_FOLDERS = ("synthetic-65d1fae60f", "synthetic-9ec3a3f887")


def _digest(cfg: SyntheticConfig) -> tuple[str, list[np.ndarray]]:
    h, masks = hashlib.sha256(), []
    for i in range(6):
        img, mask, _ = render_image(np.random.default_rng([4, i]), cfg)
        h.update(img.tobytes())
        h.update(mask.tobytes())
        masks.append(mask)
    return h.hexdigest(), masks


def test_object_scale_default_reproduces_the_old_images_and_folders():
    digest, _ = _digest(SyntheticConfig(num_classes=6, image_size=48, seed=4))
    assert digest == OLD_DIGEST
    names = (default_root(SyntheticConfig(), Path("c")).name,
             default_root(SyntheticConfig(num_classes=6, seed=1), Path("c")).name)
    assert names == OLD_FOLDERS  # the cached demo data keep their folder (no regeneration, same stamp)


def test_object_scale_changes_the_objects_size():
    _, base = _digest(SyntheticConfig(num_classes=6, image_size=48, seed=4))
    _, small = _digest(SyntheticConfig(num_classes=6, image_size=48, seed=4, object_scale=0.6))
    _, large = _digest(SyntheticConfig(num_classes=6, image_size=48, seed=4, object_scale=1.4))
    area = [sum(int(((m > 0) & (m < 255)).sum()) for m in ms) for ms in (small, base, large)]
    assert area[0] < area[1] < area[2]
    assert default_root(SyntheticConfig(object_scale=0.6), Path("c")) != default_root(SyntheticConfig(), Path("c"))


def test_object_scale_must_be_positive():
    from tokenseg.config import load_config
    from tokenseg.core.errors import TokensegError

    with pytest.raises(TokensegError, match="object_scale"):
        load_config("demo", ["data.synthetic.object_scale=0"])


def _bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_demos.py"
    spec = importlib.util.spec_from_file_location("bench_demos", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_datasets_differ_from_the_demo_and_span_the_asked_ranges():
    from tokenseg.config import load_config

    bench = _bench()
    demo = load_config("demo").data.synthetic
    assert len(bench.DATASETS) >= 3
    for name, d in bench.DATASETS.items():
        cfg = SyntheticConfig(**d)
        assert cfg.seed != demo.seed and 4 <= cfg.num_classes <= 8, name
    sizes = {SyntheticConfig(**d).image_size for d in bench.DATASETS.values()}
    scales = {SyntheticConfig(**d).object_scale for d in bench.DATASETS.values()}
    co = {SyntheticConfig(**d).cooccurrence for d in bench.DATASETS.values()}
    assert len(sizes) > 1 and len(scales) > 1 and len(co) > 1


def test_bench_own_kinds_are_the_demo_commands_own_kinds():
    """The bench judges each method by the kind `tokenseg demo --method M` prints as its own."""
    from tokenseg.config import load_config
    from tokenseg.pipeline import own_kind

    bench = _bench()
    for recipe, (own, base, kinds) in bench.RECIPES.items():
        method = load_config(recipe).model.method
        made = {k: {"miou": 0.0} for k in kinds}
        if own is not None:
            assert own_kind(method, made) == own, recipe
        assert not any(k.endswith("_affinity") for k in kinds)
        assert base is None or base in kinds


def test_bench_smoke_end_to_end(tmp_path):
    """The bench's --smoke run: two recipes train, make seeds and land in the table with mean ± std."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_demos.py"
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(script), "--smoke", "--methods", "demo,demo-pot", "--out", str(out),
                          "--json", str(tmp_path / "b.json"), "--quiet"], capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, "TOKENSEG_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    table = json.loads((tmp_path / "b.json").read_text())
    recipes = [r[1] for r in table["rows"]]
    assert recipes == ["demo", "demo-pot"]
    pot = table["runs"]["smoke"]["demo-pot"]["variance"]
    assert pot["seeds"] == ["0", "1"] and set(pot["kinds"]) == {"pot", "cam"}
    assert "±" in res.stdout and "demo-pot" in res.stdout


@pytest.mark.parametrize("method,own", [("cti", "fused"), ("otpl", "otpl"), ("pot", "pot"), ("mmcst", "fused"),
                                        ("mctformer-plus", "fused")])
def test_demo_judges_a_method_by_its_own_kind_before_affinity(method, own):
    """The issue's list: POT `pot`, OTPL `otpl`, CTI's and MMCST's default kind without the refinement."""
    from tokenseg.pipeline import compare_table, own_kind

    made = {k: {"miou": m, "threshold": 0.3, "fp": 1.0, "fn": 2.0}
            for k, m in {own: 20.0, "attention": 35.0, "cam": 30.0, "fused": 25.0}.items()}
    assert own_kind(method, made) == own
    text = compare_table({"m (own)": made, "m": made}, kinds={"m (own)": own}).splitlines()
    assert text[2].split()[-4] == f"{made[own]['miou']:.2f}"  # the named kind, not the best
    assert text[3].split()[-4] == "35.00"  # the best kind


def test_own_kind_falls_back_to_the_best_kind_made():
    from tokenseg.pipeline import own_kind

    assert own_kind("cti", {"attention": {"miou": 3.0}, "patchcam": {"miou": 5.0}}) == "patchcam"


def test_demo_method_prints_its_own_seeds_next_to_mctformer_plus(tmp_path, capsys):
    """`tokenseg demo --method cti` as a user runs it (tiny data and model): its own kind's row, its best
    kind's row, MCTformer+'s reference row (trained once beside it) and the line on what the demo shows."""
    import json

    from tokenseg.cli import main

    data = ["data.synthetic={num_classes: 3, image_size: 48, train_images: 32, val_images: 8, seed: 2}",
            f"data.cache_dir={tmp_path / 'c'}"]
    tiny = ["model.img_size=48", "model.backbone_kwargs={img_size: 48, patch_size: 8, embed_dim: 32, depth: 2, "
            "num_heads: 2}", "train.max_steps=2", "train.batch_size=8", "cti.swap_layer=0", "cti.memory_size=4",
            "cti.train_attn_layers=2", "maps.scales=[1.0]"]
    out = tmp_path / "demo-cti"
    assert main(["demo", "--method", "cti", "--seeds-only", "--out", str(out), *data, *tiny, "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = {ln.split()[0] + (" (own)" if "(own)" in ln else ""): ln for ln in printed.splitlines()
            if ln.startswith(("cti", "mctformer-plus"))}
    assert "fused (attention x PatchCAM)" in rows["cti (own)"]
    assert "mctformer-plus" in rows and "What this shows" in printed and "What it cannot" in printed
    res = json.loads((out / "demo_results.json").read_text())
    assert res["own_kind"] == "fused" and f"{res['seeds']['fused']['miou']:6.2f}" in rows["cti (own)"]
    assert (tmp_path / "demo" / "checkpoint.pt").is_file()  # the reference, trained once beside it


def test_a_method_demo_never_shares_its_folder_with_the_reference(tmp_path):
    """`--out x/demo` for a method's demo: MCTformer+'s reference goes inside it, not into the same folder
    (which stopped the run with "made with other settings"); otherwise it sits beside, shared."""
    from tokenseg.pipeline import reference_folder

    assert reference_folder(tmp_path / "demo-cti") == tmp_path / "demo"
    assert reference_folder(tmp_path / "demo") == tmp_path / "demo" / "demo"
    assert reference_folder(tmp_path / "x" / ".." / "demo") == tmp_path / "x" / ".." / "demo" / "demo"


def test_bench_without_mctformer_plus_says_not_judged_not_passed(tmp_path):
    """A run of one recipe alone (no MCTformer+ on that dataset) cannot pass the 0.8× rule: it says so."""
    bench = _bench()
    stats = {"mean": 12.6, "std": 0.1, "n": 3}
    results = {"k6-s1": {"demo-cti": {"variance": {"kinds": {"fused": stats}, "best": stats}, "rows": []}}}
    _, rows, failures = bench.summarise(results, tmp_path)
    assert rows[0][7] == "nan"
    assert failures == [f"k6-s1: demo-cti: not judged, no MCTformer+ run on this dataset in {tmp_path} "
                        f"(add --methods demo,...)"]
