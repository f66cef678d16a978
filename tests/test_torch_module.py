"""One module view of a model (``gen_fn.module()``, ``named_parameters()`` with the modules'
own names, state_dict round trip), the warning for modules built inside a body, and
TorchGenerativeFunction's ``arg_grads`` and dtype conversion."""

from __future__ import annotations

import warnings

import pytest
import torch

import gfcomb as gf

encoder = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def make_model():
    head = torch.nn.Linear(1, 1)

    @gf.gen
    def inner(x):
        return gf.normal(head(encoder(x))[0], 1.0) @ "y"

    @gf.gen
    def outer(xs):
        return gf.Map(inner)(xs) @ "pts"

    return head, inner, outer


def test_named_parameters_keep_the_modules_names():
    head, inner, outer = make_model()
    names = dict(inner.named_parameters())
    assert set(names) == {"encoder.0.weight", "encoder.0.bias", "encoder.2.weight",
                          "encoder.2.bias", "head.weight", "head.bias"}
    assert names["head.weight"] is head.weight
    # an outer function sees its callees' (and kernels') modules
    assert set(dict(outer.named_parameters())) == set(names)
    assert set(outer.module().keys()) == {"encoder", "head"}


def test_module_state_dict_round_trip_and_to():
    head, inner, outer = make_model()
    m = outer.module()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        head.weight.add_(1.0)
    assert not torch.equal(head.weight, sd["head.weight"])
    outer.module().load_state_dict(sd)
    assert torch.equal(head.weight, sd["head.weight"])
    outer.module().to(torch.float64)
    assert head.weight.dtype == torch.float64 and encoder[0].weight.dtype == torch.float64
    outer.module().to(torch.float32)


def test_modules_built_inside_a_body_are_reported():
    @gf.gen
    def bad(x):
        lin = torch.nn.Linear(1, 1)
        return gf.normal(lin(x)[0], 1.0) @ "y"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            bad.simulate((torch.ones(1),))
    msgs = [str(w.message) for w in caught if "creates new torch modules" in str(w.message)]
    assert len(msgs) == 1 and "Linear" in msgs[0] and "outside the body" in msgs[0]


def test_branches_calling_other_modules_are_not_reported():
    mods = torch.nn.ModuleList([torch.nn.Linear(1, 1) for _ in range(3)])

    @gf.gen
    def ok(x, k):
        return gf.normal(mods[k](x)[0], 1.0) @ "y"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in (0, 0, 1, 1, 2, 2, 0):
            ok.simulate((torch.ones(1), k))


# ============================================================ TorchGenerativeFunction args
class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, a, b):
        return self.lin(a * b).sum()


def test_arg_grads_none_for_a_masked_argument():
    net = Two().double()
    tg = gf.TorchGenerativeFunction(net, arg_grads=(True, False))
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    tr = tg.simulate((a, b))
    grads, _, _ = tg.choice_gradients(tr, None, torch.tensor(1.0))
    assert grads[1] is None
    assert torch.allclose(grads[0], net.lin.weight[0] * b)
    full = gf.TorchGenerativeFunction(net)
    g2, _, _ = full.choice_gradients(full.simulate((a, b)), None, torch.tensor(1.0))
    assert torch.allclose(g2[1], net.lin.weight[0] * a)

    @gf.gen
    def model(a, b):
        return gf.normal(tg(a, b) @ "net", 1.0) @ "y"

    mt, _ = model.generate((a, b), gf.ChoiceMap({"y": 0.3}))
    mg, _, _ = model.choice_gradients(mt, None)
    assert mg[1] is None or torch.count_nonzero(mg[1]) == 0  # no gradient through b
    assert torch.count_nonzero(mg[0]) > 0


def test_arg_grads_wrong_length_is_an_argument_error():
    tg = gf.TorchGenerativeFunction(Two(), arg_grads=(True,))
    with pytest.raises(gf.ArgumentError, match="arg_grads"):
        tg.simulate((torch.ones(2), torch.ones(2)))
    with pytest.raises(gf.ArgumentError, match="bools"):
        gf.TorchGenerativeFunction(Two(), arg_grads=(1, 0))


def test_inputs_are_converted_to_the_modules_dtype():
    net = Two().float()
    tg = gf.TorchGenerativeFunction(net)
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    tr = tg.simulate((a, a))
    assert tr.retval.dtype == torch.float32
    assert torch.allclose(tr.retval.double(), net.lin(a.float() * a.float()).sum().double())
    # integers are left alone; float16 input is converted too
    assert tg.simulate((a.half(), a)).retval.dtype == torch.float32
    ys = torch.func.vmap(lambda x: tg.simulate((x, x)).retval)(torch.ones(3, 2,
                                                                          dtype=torch.float64))
    assert ys.dtype == torch.float32 and ys.shape == (3,)
