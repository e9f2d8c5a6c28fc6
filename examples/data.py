"""Datasets and partitions: DomainNet / NICO++ from local folders, offline digits domains.

Nothing here needs timm or torchvision: images are decoded with Pillow and normalised in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

__all__ = [
    "DIGIT_DOMAINS",
    "DOMAINNET_DOMAINS",
    "NICO_DOMAINS",
    "ArrayDataset",
    "ClientData",
    "DatasetLayoutError",
    "Domain",
    "ImageListDataset",
    "digits_domains",
    "feature_label_noniid",
    "feature_noniid",
    "labels_of",
    "load_domainnet",
    "load_nico",
    "subset",
]

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
NICO_DOMAINS = ("autumn", "dim", "grass", "outdoor", "rock", "water")
DIGIT_DOMAINS = ("clean", "inverted", "rotated", "noisy", "blurred", "edges")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class DatasetLayoutError(FileNotFoundError):
    """A data folder is missing or does not have the expected layout."""


class ArrayDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64 held in memory."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class ImageListDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images decoded on access: RGB, resized to ``size`` × ``size``, normalised by mean/std."""

    def __init__(
        self,
        items: Sequence[tuple[Path, int]],
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.items = list(items)
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1)
        return (x - self.mean) / self.std, torch.tensor(label, dtype=torch.int64)


@dataclass(frozen=True)
class Domain:
    """One domain: its name and train / test datasets."""

    name: str
    train: Dataset[tuple[Tensor, Tensor]]
    test: Dataset[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ClientData:
    """One client's local training data and the domain it comes from."""

    domain: str
    data: Dataset[tuple[Tensor, Tensor]]

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]


def subset(
    ds: Dataset[tuple[Tensor, Tensor]], idx: Sequence[int]
) -> Dataset[tuple[Tensor, Tensor]]:
    """Rows ``idx`` of ``ds``: an :class:`ArrayDataset` stays in memory, others become Subset."""
    if isinstance(ds, ArrayDataset):
        t = torch.as_tensor(list(idx), dtype=torch.int64)
        return ArrayDataset(ds.x[t], ds.y[t])
    return Subset(ds, list(idx))


def labels_of(ds: Dataset[tuple[Tensor, Tensor]]) -> list[int]:
    """Labels without decoding images."""
    if isinstance(ds, ArrayDataset):
        return [int(v) for v in ds.y.tolist()]
    if isinstance(ds, ImageListDataset):
        return ds.labels
    if isinstance(ds, Subset):
        inner = labels_of(ds.dataset)
        return [inner[i] for i in ds.indices]
    return [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- folder datasets

_LAYOUT = """expected layout under {root}:
  {root}/<domain>/<class>/<image>.jpg|png       for each domain in {domains}
  {root}/<domain>_train.txt, <domain>_test.txt  optional split files, one
                                                '<domain>/<class>/<image> <label>' per line
(DomainNet: the official 'clipart/...' folders and 'clipart_train.txt' files unpacked side by
side; NICO++: the DG-track folders renamed or linked to the domain names above)"""


def _layout_error(msg: str, root: Path, domains: Sequence[str]) -> DatasetLayoutError:
    return DatasetLayoutError(f"{msg}\n{_LAYOUT.format(root=root, domains=', '.join(domains))}")


def _read_split(path: Path, root: Path, num_classes: int) -> list[tuple[Path, int]]:
    items: list[tuple[Path, int]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetLayoutError(
                f"{path}:{lineno}: expected '<relative path> <label>', got {line!r}"
            )
        label = int(parts[1])
        if 0 <= label < num_classes:
            items.append((root / parts[0], label))
    return items


def _load_folder_domains(
    root: str | Path,
    domains: Sequence[str],
    *,
    num_classes: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    test_fraction: float,
    seed: int,
) -> list[Domain]:
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(f"data root {root} does not exist or is not a folder", root, domains)
    out: list[Domain] = []
    for d in domains:
        folder = root / d
        if not folder.is_dir():
            raise _layout_error(f"missing domain folder {folder}", root, domains)
        train_txt, test_txt = root / f"{d}_train.txt", root / f"{d}_test.txt"
        if train_txt.is_file() and test_txt.is_file():
            train = _read_split(train_txt, root, num_classes)
            test = _read_split(test_txt, root, num_classes)
        else:
            classes = sorted(p.name for p in folder.iterdir() if p.is_dir())[:num_classes]
            if not classes:
                raise _layout_error(f"domain folder {folder} has no class folders", root, domains)
            rng = np.random.default_rng([seed, len(out)])
            train, test = [], []
            for label, c in enumerate(classes):
                files = sorted(
                    p for p in (folder / c).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
                )
                order = rng.permutation(len(files))
                n_test = round(len(files) * test_fraction) if len(files) > 1 else 0
                test += [(files[i], label) for i in order[:n_test]]
                train += [(files[i], label) for i in order[n_test:]]
        if not train or not test:
            raise _layout_error(f"domain {d!r} has no train or no test images", root, domains)
        missing = [p for p, _ in train[:1] + test[:1] if not p.is_file()]
        if missing:
            raise _layout_error(
                f"split file names {missing[0]}, which does not exist", root, domains
            )
        tr = ImageListDataset(train, size=size, mean=mean, std=std)
        te = ImageListDataset(test, size=size, mean=mean, std=std)
        out.append(Domain(d, tr, te))
    return out


def load_domainnet(
    root: str | Path,
    *,
    size: int = 224,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    num_classes: int = 100,
    domains: Sequence[str] = DOMAINNET_DOMAINS,
    seed: int = 0,
) -> list[Domain]:
    """DomainNet's six domains, first ``num_classes`` classes (labels ``< num_classes``).

    Uses the official ``<domain>_train.txt`` / ``<domain>_test.txt`` when both are present,
    otherwise the first ``num_classes`` class folders in sorted order (the official label order)
    with a seeded 80/20 split per class.
    """
    return _load_folder_domains(
        root,
        domains,
        num_classes=num_classes,
        size=size,
        mean=mean,
        std=std,
        test_fraction=0.2,
        seed=seed,
    )


def load_nico(
    root: str | Path,
    *,
    size: int = 224,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    num_classes: int = 60,
    domains: Sequence[str] = NICO_DOMAINS,
    seed: int = 0,
) -> list[Domain]:
    """NICO++'s six domains and 60 classes; split files as for DomainNet, else seeded 80/20."""
    return _load_folder_domains(
        root,
        domains,
        num_classes=num_classes,
        size=size,
        mean=mean,
        std=std,
        test_fraction=0.2,
        seed=seed,
    )


# --------------------------------------------------------------------------- offline digits


def _blur(x: Tensor) -> Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k2 = (k[:, None] * k[None, :]) / 256.0
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k2.view(1, 1, 5, 5))


def _edges(x: Tensor) -> Tensor:
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    g = torch.sqrt(F.conv2d(p, sx) ** 2 + F.conv2d(p, sx.transpose(2, 3)) ** 2)
    return g / g.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def _style(x: Tensor, domain: str, generator: torch.Generator) -> Tensor:
    """Apply one of the six digit styles to images in [0, 1] of shape (N, 1, H, W)."""
    transforms: dict[str, Callable[[Tensor], Tensor]] = {
        "clean": lambda t: t,
        "inverted": lambda t: 1.0 - t,
        "rotated": lambda t: torch.rot90(t, k=1, dims=(2, 3)),
        "noisy": lambda t: (t + 0.25 * torch.randn(t.shape, generator=generator)).clamp(0, 1),
        "blurred": _blur,
        "edges": _edges,
    }
    return transforms[domain](x)


def digits_domains(
    *,
    size: int = 16,
    pretrain_fraction: float = 0.4,
    test_fraction: float = 0.2,
    max_train_per_domain: int | None = None,
    max_test_per_domain: int | None = None,
    pretrain_styles: Sequence[str] = DIGIT_DOMAINS,
    seed: int = 0,
) -> tuple[ArrayDataset, list[Domain]]:
    """scikit-learn's bundled 8×8 digits (1797 images) as a source task plus six domains.

    The images are split once (seeded) into a *pretrain* part (the source task a base model is
    pre-trained on: each image in one of ``pretrain_styles``, cycling, the way ImageNet-21k
    already holds clipart, paintings and sketches), a federated *train* part and a *test* part.
    Each of the six domains (clean, inverted, rotated by 90°, Gaussian noise σ = 0.25, 5×5
    binomial blur, Sobel edges) gets a disjoint sixth of the train part and the whole test
    part, both in its style, so clients differ in features (style) and images, as DomainNet's
    domains do. Images are upsampled to ``size`` × ``size``, one channel, standardised by the
    mean/std of all clean images.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x_all = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y_all = torch.tensor(bunch.target, dtype=torch.int64)
    x_all = F.interpolate(x_all, size=(size, size), mode="bilinear", align_corners=False)
    n = x_all.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_pre, n_test = int(n * pretrain_fraction), int(n * test_fraction)
    pre_idx, test_idx, train_idx = (
        perm[:n_pre],
        perm[n_pre : n_pre + n_test],
        perm[n_pre + n_test :],
    )
    mean, std = x_all.mean(), x_all.std()

    def norm(t: Tensor) -> Tensor:
        return (t - mean) / std

    x_pre = x_all[pre_idx].clone()
    g_pre = torch.Generator().manual_seed(seed * 1000 + 999)
    for j, name in enumerate(pretrain_styles):
        x_pre[j :: len(pretrain_styles)] = _style(x_pre[j :: len(pretrain_styles)], name, g_pre)
    pretrain = ArrayDataset(norm(x_pre), y_all[pre_idx])
    chunk = math.ceil(train_idx.numel() / len(DIGIT_DOMAINS))
    domains = []
    for j, name in enumerate(DIGIT_DOMAINS):
        g = torch.Generator().manual_seed(seed * 1000 + j)
        tr = train_idx[j * chunk : (j + 1) * chunk][:max_train_per_domain]
        te = test_idx[:max_test_per_domain]
        domains.append(
            Domain(
                name,
                ArrayDataset(norm(_style(x_all[tr], name, g)), y_all[tr]),
                ArrayDataset(norm(_style(x_all[te], name, g)), y_all[te]),
            )
        )
    return pretrain, domains


# --------------------------------------------------------------------------- partitions


def feature_noniid(domains: Sequence[Domain]) -> list[ClientData]:
    """The paper's feature non-IID split: one client per domain holding all its training data."""
    return [ClientData(d.name, d.train) for d in domains]


def feature_label_noniid(
    domains: Sequence[Domain], *, clients_per_domain: int = 5, alpha: float = 0.5, seed: int = 0
) -> list[ClientData]:
    """Feature + label non-IID: each domain's data split over ``clients_per_domain`` clients.

    For every class of a domain, its samples are divided between the domain's clients in
    proportions drawn from ``Dirichlet(alpha)`` (seeded), the usual label-skew construction.
    Clients left with no sample get one sample moved from the largest client of their domain.
    """
    rng = np.random.default_rng(seed)
    out: list[ClientData] = []
    for d in domains:
        labels = np.asarray(labels_of(d.train))
        parts: list[list[int]] = [[] for _ in range(clients_per_domain)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(clients_per_domain, alpha))
            cuts = (np.cumsum(props)[:-1] * idx.size).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in piece)
        for k in range(clients_per_domain):
            if not parts[k]:
                donor = max(range(clients_per_domain), key=lambda j: len(parts[j]))
                if len(parts[donor]) > 1:
                    parts[k].append(parts[donor].pop())
        out += [ClientData(d.name, subset(d.train, sorted(p))) for p in parts if p]
    return out
