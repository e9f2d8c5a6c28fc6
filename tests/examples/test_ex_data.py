"""Data loaders on a tiny generated DomainNet / NICO++ tree, partitions, digits domains."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.data import (
    DIGIT_DOMAINS,
    DOMAINNET_DOMAINS,
    NICO_DOMAINS,
    ArrayDataset,
    DatasetLayoutError,
    Domain,
    feature_label_noniid,
    feature_noniid,
    labels_of,
    load_domainnet,
    load_nico,
)

PIL = pytest.importorskip("PIL.Image")


def make_tree(
    root: Path,
    domains: tuple[str, ...],
    classes: list[str],
    *,
    per_class: int = 3,
    split_files: bool = False,
) -> None:
    """``root/<domain>/<class>/<i>.png`` (8×8 RGB, colour encodes domain and class)."""
    for di, d in enumerate(domains):
        train_lines, test_lines = [], []
        for ci, c in enumerate(classes):
            folder = root / d / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                arr = np.full((8, 8, 3), (20 * di, 20 * ci, 50 * i), dtype=np.uint8)
                name = f"{c}_{i:03d}.png"
                PIL.fromarray(arr).save(folder / name)
                rel = f"{d}/{c}/{name} {ci}"
                (test_lines if i == 0 else train_lines).append(rel)
        if split_files:
            (root / f"{d}_train.txt").write_text("\n".join(train_lines) + "\n")
            (root / f"{d}_test.txt").write_text("\n".join(test_lines) + "\n")


def test_domainnet_official_split_files_and_class_cap(tmp_path: Path) -> None:
    make_tree(tmp_path, DOMAINNET_DOMAINS, ["aircraft", "alarm", "ant"], split_files=True)
    domains = load_domainnet(tmp_path, size=12, num_classes=2)
    assert [d.name for d in domains] == list(DOMAINNET_DOMAINS)
    for d in domains:
        assert sorted(labels_of(d.train)) == [0, 0, 1, 1]  # labels >= num_classes dropped
        assert sorted(labels_of(d.test)) == [0, 1]
        x, y = d.train[0]
        assert x.shape == (3, 12, 12)
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert torch.isfinite(x).all()
    # mean/std normalisation: pixel value v/255 maps to (v/255 - 0.5) / 0.5
    x, y = domains[1].train[0]  # infograph: red channel 20/255
    assert torch.allclose(x[0], torch.full((12, 12), (20 / 255 - 0.5) / 0.5), atol=1e-6)


def test_nico_without_split_files_uses_seeded_split(tmp_path: Path) -> None:
    make_tree(tmp_path, NICO_DOMAINS, ["bear", "bird"], per_class=5)
    a = load_nico(tmp_path, size=8, seed=1)
    b = load_nico(tmp_path, size=8, seed=1)
    for da, db in zip(a, b, strict=True):
        assert len(da.train) == 8
        assert len(da.test) == 2  # 20 % of 5 per class
        assert da.train.items == db.train.items  # type: ignore[attr-defined]
        train_files = {p for p, _ in da.train.items}  # type: ignore[attr-defined]
        assert not train_files & {p for p, _ in da.test.items}  # type: ignore[attr-defined]
    assert Counter(labels_of(a[0].train)) == {0: 4, 1: 4}


def test_missing_domain_names_the_expected_layout(tmp_path: Path) -> None:
    make_tree(tmp_path, DOMAINNET_DOMAINS[:2], ["ant"])
    with pytest.raises(DatasetLayoutError, match=r"missing domain folder .*painting") as err:
        load_domainnet(tmp_path)
    assert "<domain>/<class>/<image>" in str(err.value)
    assert "clipart, infograph, painting, quickdraw, real, sketch" in str(err.value)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_nico(tmp_path / "nope")


def test_malformed_split_file_is_reported_with_line(tmp_path: Path) -> None:
    make_tree(tmp_path, DOMAINNET_DOMAINS, ["ant"], split_files=True)
    (tmp_path / "real_train.txt").write_text("real/ant/ant_001.png\n")
    with pytest.raises(DatasetLayoutError, match=r"real_train.txt:1"):
        load_domainnet(tmp_path)


def _domains(n_per_class: int = 20, classes: int = 4) -> list[Domain]:
    out = []
    for j in range(6):
        y = torch.arange(classes).repeat_interleave(n_per_class)
        x = torch.randn(y.numel(), 1, 4, 4) + j
        out.append(Domain(f"d{j}", ArrayDataset(x, y), ArrayDataset(x[:4], y[:4])))
    return out


def test_feature_noniid_is_one_client_per_domain() -> None:
    domains = _domains()
    clients = feature_noniid(domains)
    assert [c.domain for c in clients] == [d.name for d in domains]
    assert all(c.data is d.train for c, d in zip(clients, domains, strict=True))


def test_feature_label_noniid_partitions_each_domain_with_label_skew() -> None:
    domains = _domains()
    clients = feature_label_noniid(domains, clients_per_domain=5, alpha=0.5, seed=3)
    assert len(clients) == 30
    for d in domains:
        mine = [c for c in clients if c.domain == d.name]
        assert len(mine) == 5
        xs = torch.cat([c.data.x for c in mine])  # type: ignore[attr-defined]
        ref = d.train.x  # type: ignore[attr-defined]
        # every sample of the domain lands in exactly one client: same multiset of rows
        assert xs.shape == ref.shape
        torch.testing.assert_close(xs.sum(0), ref.sum(0), rtol=1e-5, atol=1e-4)
        assert sum(len(c) for c in mine) == len(d.train)  # type: ignore[arg-type]
    # label skew: some client's label histogram is far from uniform
    hist = [Counter(labels_of(c.data)) for c in clients]
    assert max(max(h.values()) / sum(h.values()) for h in hist) > 0.5
    again = feature_label_noniid(domains, clients_per_domain=5, alpha=0.5, seed=3)
    assert [labels_of(c.data) for c in again] == [labels_of(c.data) for c in clients]


def test_digits_domains_are_six_styles_of_disjoint_images() -> None:
    pytest.importorskip("sklearn")
    from examples.data import digits_domains

    pre, domains = digits_domains(size=16, seed=0)
    assert [d.name for d in domains] == list(DIGIT_DOMAINS)
    assert pre.x.shape[1:] == (1, 16, 16)
    sizes = [len(d.train) for d in domains]
    assert min(sizes) >= 100
    assert len(pre) + sum(sizes) + len(domains[0].test) == 1797
    clean, inverted, rotated = domains[0].test, domains[1].test, domains[2].test
    assert torch.equal(clean.y, inverted.y)  # type: ignore[attr-defined]
    # inverted is 1 - clean before standardisation: the two are perfectly anti-correlated
    c = torch.corrcoef(torch.stack([clean.x.flatten(), inverted.x.flatten()]))  # type: ignore[attr-defined]
    assert float(c[0, 1]) < -0.999
    torch.testing.assert_close(rotated.x, torch.rot90(clean.x, 1, (2, 3)))  # type: ignore[attr-defined]
    for d in domains:
        assert torch.isfinite(d.train.x).all()  # type: ignore[attr-defined]
