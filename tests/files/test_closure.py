"""The closure's session (``files/closure.py``): the finder serves the model's folder to the
model's own code only, and everything comes out of ``sys.meta_path`` when the session ends."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from sugarize.files import closure
from sugarize.files.modelfile import load_model

MODEL = """import torch.nn as nn
class M(nn.Module):
    def forward(self, x):
        import libonly
        return x * libonly.X
def build_model():
    return M()
"""


def test_the_models_folder_serves_the_models_own_imports_only_and_only_in_the_session(tmp_path):
    (tmp_path / "libonly.py").write_text("X = 3\n")
    (tmp_path / "model.py").write_text(MODEL)
    before = list(sys.meta_path)
    try:
        with closure.session():
            loaded = load_model(tmp_path / "model.py")
            with pytest.raises(ModuleNotFoundError):  # a library's import of that name: not the model's file
                importlib.import_module("libonly")
            assert loaded.model(torch.ones(1)).item() == 3.0  # the model's own import, in its forward
            assert "libonly.py" in loaded.closure
        assert sys.meta_path == before  # the session's finders are gone with it
        sys.modules.pop("libonly", None)
        with pytest.raises(ModuleNotFoundError):  # outside a session, the forward's import is not served
            loaded.model(torch.ones(1))
    finally:
        sys.modules.pop("libonly", None)
