"""Label files: our JSON (write/read), class-name files, and importing the authors' pickled cls_labels.npy."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tokenseg.cli import main
from tokenseg.data import (VOC_CLASSES, WSSSDataset, import_cls_labels_npy, read_class_names,
                           read_labels_table, write_labels_file)
from tokenseg.core.errors import TokensegError


def _npy(path, keys, dim=20):
    rng = np.random.default_rng(0)
    d = {}
    for k in keys:
        v = np.zeros(dim, np.float32)
        v[rng.choice(dim, 2, replace=False)] = 1
        d[k] = v
    np.save(path, d)
    return d


def test_import_npy_needs_allow_pickle_and_warns(tmp_path, capsys):
    src = tmp_path / "cls_labels.npy"
    d = _npy(src, ["2007_000032", "2007_000039"])
    with pytest.raises(TokensegError, match="--allow-pickle"):
        import_cls_labels_npy(src)
    out = tmp_path / "labels.json"
    assert main(["data", "labels", "--import-npy", str(src), "-o", str(out)]) == 2
    assert "allow-pickle" in capsys.readouterr().err and not out.exists()
    assert main(["data", "labels", "--import-npy", str(src), "--allow-pickle", "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert "pickle can run code" in cap.err and "wrote 2 images x 20 classes" in cap.out
    doc = json.loads(out.read_text())
    assert doc["classes"] == VOC_CLASSES and doc["source"].startswith("npy:cls_labels.npy")
    for k, v in d.items():
        assert doc["labels"][k] == [VOC_CLASSES[c] for c in np.flatnonzero(v)]
    table = read_labels_table(out)  # our plain JSON reads back
    assert table.classes == VOC_CLASSES and set(table.labels) == set(d)


def test_import_npy_int_keys_and_other_dims(tmp_path):
    src = tmp_path / "irn.npy"
    _npy(src, [2007000032, 2008000123])  # IRN stores ids as ints
    classes, labels, _ = import_cls_labels_npy(src, allow_pickle=True)
    assert sorted(labels) == ["2007_000032", "2008_000123"] and len(classes) == 20
    _npy(src, ["a", "b"], dim=3)
    with pytest.raises(TokensegError, match="3-dim labels; give the class names"):
        import_cls_labels_npy(src, allow_pickle=True)
    classes, labels, _ = import_cls_labels_npy(src, ["x", "y", "z"], allow_pickle=True)
    assert classes == ["x", "y", "z"]
    np.save(src, np.zeros(3))
    with pytest.raises(TokensegError, match="expected a non-empty dict"):
        import_cls_labels_npy(src, allow_pickle=True)


def test_write_labels_file_from_dataset_and_mapping(tmp_path):
    ds = WSSSDataset(name="t", class_names=["a", "b c"], ids=["x", "ÿ"], image_paths=[tmp_path / "x.jpg"] * 2,
                     labels=[[1], []], label_source="xml:Annotations")
    p = write_labels_file(tmp_path / "out" / "l.json", ds)
    doc = json.loads(p.read_text(encoding="utf-8"))
    assert doc == {"format": "tokenseg-labels", "version": 1, "classes": ["a", "b c"],
                   "source": "xml:Annotations", "labels": {"x": ["b c"], "ÿ": []}}
    with pytest.raises(TokensegError, match="outside 0..1"):
        write_labels_file(tmp_path / "bad.json", {"x": [2]}, ["a", "b"], "test")
    assert not (tmp_path / "bad.json").exists()


def test_class_names_file(tmp_path):
    p = tmp_path / "names.txt"
    p.write_text("\ufeff__background__\n# comment\naeroplane\n\nbicycle\n")
    assert read_class_names(p) == ["aeroplane", "bicycle"]
    p.write_text("a\nb\na\n")
    with pytest.raises(TokensegError, match="'a' is listed twice"):
        read_class_names(p)
    j = tmp_path / "names.json"
    j.write_text('["x", "y"]')
    assert read_class_names(j) == ["x", "y"]
    with pytest.raises(TokensegError, match="not found"):
        read_class_names(tmp_path / "missing.txt")
