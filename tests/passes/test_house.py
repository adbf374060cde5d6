"""The activation table row by row, with a guard that fails when a row has no case (as optimum's
test_all_models_tested does for its registry); facts the docs state, made true (#30)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sugarize
from sugarize.passes.activations import ACTIVATIONS

from helpers import same_bits

# kind -> (module, the same function called functionally, relufy word or None, skipped?)
TABLE_CASES = {
    "relu": (nn.ReLU, lambda x: F.relu(x), None, False),
    "gelu": (nn.GELU, lambda x: F.gelu(x), "gelu", False),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"), "gelu", False),
    "silu": (nn.SiLU, lambda x: F.silu(x), "silu", False),
    "relu6": (nn.ReLU6, lambda x: F.relu6(x), None, True),
    "leaky_relu": (nn.LeakyReLU, lambda x: F.leaky_relu(x), None, True),
}


def test_every_row_of_the_activation_table_has_a_case():
    assert sorted(TABLE_CASES) == sorted(ACTIVATIONS)


class _Uses(nn.Module):
    """One module site and one functional site of a kind (the call written out in the forward,
    as a user writes it: the modules path finds calls by the names in a forward's code)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.l1, self.act, self.l2 = nn.Linear(8, 8), TABLE_CASES[kind][0](), nn.Linear(8, 8)

    def forward(self, x):
        h, k = self.act(self.l1(x)), self.kind
        if k == "relu":
            h = F.relu(h)
        elif k == "gelu":
            h = F.gelu(h)
        elif k == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif k == "silu":
            h = F.silu(h)
        elif k == "relu6":
            h = F.relu6(h)
        else:
            h = F.leaky_relu(h)
        return self.l2(h)


@pytest.mark.filterwarnings("ignore:relufied functional calls")  # the modules path says so on strip, as it should
@pytest.mark.parametrize("capture", ["fx", "modules"])
@pytest.mark.parametrize("kind", sorted(TABLE_CASES))
def test_each_kind_is_found_on_each_path_and_converted_as_its_row_says(kind, capture):
    torch.manual_seed(0)
    model = _Uses(kind)
    x = torch.randn(4, 8) * 3
    _, _, relufy, skipped = TABLE_CASES[kind]
    report = sugarize.inspect(model, example_args=(x,))
    assert [s.kind for s in report.sites] == [kind, kind]
    sm = sugarize.sugarize(model, relufy=(relufy,) if relufy else (), capture=capture, example_args=(x,))
    sites = sugarize.report_of(sm).sites
    converted = [s for s in sites if s.status == "converted"]
    if skipped:
        assert not converted
        assert all(s.reason == ACTIVATIONS[kind].skip for s in sites if s.status == "skipped")
        assert same_bits(sm(x), model(x))
        if capture == "fx":
            assert sugarize.count_sugar(sm) == 0
        # no SUGAR computed at run time either: the gradient is the original's (the modules path
        # hooks this forward, as its code names F.relu on a branch it never takes: count_sugar's
        # estimate from the code counts it)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        sm(xa).sum().backward()
        model(xb).sum().backward()
        assert same_bits(xa.grad, xb.grad)
        return
    # the module site is converted on both paths; the functional one on fx (modules: as it runs)
    assert sugarize.count_sugar(sm) >= 1 and converted
    plain = sugarize.strip(sm)
    assert sugarize.count_sugar(plain) == 0
    if relufy is None:  # SUGAR on a ReLU: the forward is ReLU's, bit for bit, before and after strip
        assert same_bits(sm(x), model(x)) and same_bits(plain(x), model(x))
    else:  # relufied: both sites compute ReLU now
        relu_model = _Uses("relu")
        relu_model.load_state_dict(model.state_dict())
        relu_model.act = nn.ReLU()
        assert same_bits(plain(x), relu_model(x)) and same_bits(sm(x), relu_model(x))


def test_count_sugar_counts_a_model_converted_only_through_its_functional_calls():
    class Calls(nn.Module):  # data-dependent control flow: no trace; F.relu: no module to swap
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return F.relu(self.lin(x)) if x.sum() > -1e9 else x

    sm = sugarize.sugarize(Calls())
    assert sugarize.report_of(sm).capture == "modules"
    assert sugarize.count_sugar(sm) == 1  # was 0: "0 SUGAR sites stripped" for this model
    assert sugarize.count_sugar(sugarize.strip(sm)) == 0


def test_a_stripped_relufied_catcher_counts_no_sugar():
    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return F.gelu(self.lin(x)) if x.sum() > -1e9 else x

    sm = sugarize.sugarize(Calls(), relufy="gelu")
    with pytest.warns(sugarize.SugarizeWarning):
        plain = sugarize.strip(sm)
    assert sugarize.count_sugar(plain) == 0


def test_a_duplicate_surrogate_name_is_an_error_of_the_family():
    from sugarize.method.surrogates import Surrogate

    with pytest.raises(sugarize.SugarizeError, match="'bsilu' is already registered"):
        @sugarize.register_surrogate("bsilu")
        class Again(Surrogate):  # noqa: F811
            pass
    with pytest.raises(ValueError):  # still a ValueError for code that caught that
        @sugarize.register_surrogate("bsilu")
        class Again2(Surrogate):
            pass


def test_the_checkpoint_notes_say_which_function_ran(tmp_path):
    model = tmp_path / "m.py"
    model.write_text("import torch, torch.nn as nn\ndef build_model():\n    return nn.Sequential(nn.Linear(4, 4), "
                     "nn.ReLU())\ndef example_inputs():\n    return (torch.randn(2, 4),)\n")
    from sugarize.files.checkpoint import open_checkpoint
    from sugarize.files.modelfile import load_model

    loaded = load_model(str(model))
    sm = sugarize.sugarize(loaded.model)
    ck = sugarize.save_checkpoint(sm, tmp_path / "ck.safetensors", loaded=loaded, inputs=loaded.example_inputs)
    with pytest.warns(sugarize.SugarizeNote):
        opened = open_checkpoint(ck, model=str(model))
    assert opened.notes == ["called m.py:build_model, the name the recipe records (the default discovery picked "
                            "it); pass --model m.py:NAME to call another"]
    assert open_checkpoint(ck, model=f"{model}:build_model").notes == []


def test_relufy_surrogate_is_a_keyword_like_every_config_field():
    """Before: surrogate 'bsilu' has no parameter 'relufy_surrogate' (#31)."""
    import dataclasses

    model = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 2))
    sm = sugarize.sugarize(model, relufy="silu", relufy_surrogate="nelu")
    assert sugarize.report_of(sm).sites[0].surrogate == "nelu"
    assert sm.meta["sugarize"]["config"]["relufy_surrogate"] == "nelu"
    fields = {f.name for f in dataclasses.fields(sugarize.SugarConfig)}
    import inspect

    keywords = set(inspect.signature(sugarize.sugarize).parameters)
    assert fields <= keywords | {"params"}, fields - keywords  # every config field is a keyword (params: **params)


def test_an_unknown_keyword_is_named_as_such():
    with pytest.raises(sugarize.SugarizeError, match="unknown keyword 'relu_surrogate'.*no parameter of surrogate "
                                                     "'bsilu_dead' \\(alpha\\)"):
        sugarize.sugarize(nn.Sequential(nn.ReLU()), relu_surrogate="nelu")
    sm = sugarize.sugarize(nn.Sequential(nn.ReLU()), alpha=1.5)  # a real parameter still works
    assert sugarize.report_of(sm).sites[0].surrogate == "bsilu_dead"


def test_op_options_are_one_typed_record_read_back_from_every_kind_of_node():
    """#30: OpOptions is written into nodes and read back in one place (passes/opnodes.py), for a
    plain SUGAR node and both fused layouts; each record's args round-trip its node."""
    import torch.nn as nn

    from sugarize.options import OpOptions
    from sugarize.passes.opnodes import fused_nodes, fused_of, options_of

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))  # fused with its BatchNorm
            return self.out(torch.relu(h)) + torch.relu(h).sum()  # fused with out; a plain node (read by sum)

    sm = sugarize.sugarize(Net(), "nelu", alpha=0.3, negative_only=True)
    want = OpOptions("nelu", (0.3,), True, "full")
    nodes = [n for n in sm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.sugarize.sugar.default, *(type(fused_of(f)).TARGET for f in fused_nodes(sm.graph)))]
    kinds = sorted(type(fused_of(n)).__name__ if n in fused_nodes(sm.graph) else "plain" for n in nodes)
    assert kinds == ["FusedBN", "FusedLinear", "plain"], kinds
    assert all(options_of(n) == want for n in nodes)
    for node in fused_nodes(sm.graph):
        assert fused_of(node).args == node.args  # the record is the node's layout, both ways
    assert want.args == ("nelu", [0.3], True, "full") and OpOptions.of_args(want.args) == want
