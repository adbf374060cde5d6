"""The bundled digits data (scikit-learn's 8x8 digits, 1,797 images) as tensors and loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["digits_path", "load_digits_split", "loader"]

# Package data: installed with the wheel (pyproject.toml [tool.setuptools.package-data]).
DIGITS = Path(__file__).resolve().parent / "data" / "digits.npz"


def digits_path() -> Path:
    if DIGITS.exists():
        return DIGITS
    from ..errors import DataFileError

    raise DataFileError(f"the bundled digits data is missing ({DIGITS}); reinstall sugarize, or in a checkout run "
                        "python fixtures/make_digits.py")


def load_digits_split(val_fraction: float = 0.25, seed: int = 0):
    """((x_train, y_train), (x_val, y_val)): standardised 64-d float32 rows, a fixed split."""
    d = np.load(digits_path())
    x = torch.tensor(d["images"], dtype=torch.float32).reshape(-1, 64) / 16.0
    y = torch.tensor(d["labels"], dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(x) * val_fraction))
    tr, va = perm[n_val:], perm[:n_val]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-3
    x = (x - mean) / std
    return (x[tr], y[tr]), (x[va], y[va])


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = False, seed: int | None = None):
    """A plain list of (x, y) batches; shuffled with torch's global RNG (seeded by finetune)."""
    order = torch.randperm(len(x)) if shuffle else torch.arange(len(x))
    if seed is not None and shuffle:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(x), batch_size)]
