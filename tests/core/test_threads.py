"""The tracing runtime under threads (DESIGN §8): eight threads run different models'
simulate / generate / update / regenerate at the same time, and every result is exact.

torch's global random generator is shared by the threads, so draws cannot be replayed per
thread; exactness is checked where it is defined: (1) ``generate`` with full constraints is
deterministic and must equal, bit for bit, what one thread computed alone; (2) every
simulated trace holds exactly its own model's addresses and its score equals ``assess`` of
its choices (rtol 1e-12, float64); (3) an update that constrains one choice returns that
value and weight = new score - old score; (4) nothing raises.
"""

from __future__ import annotations

import sys
import threading

import torch

import gfcomb as gf


@gf.gen
def _leaf(mu):
    return gf.normal(mu, 1.0) @ "z"


@gf.gen
def nested(x):
    a = gf.normal(x, 1.0) @ "a"
    b = _leaf(a) @ "sub"
    return gf.normal(b, 0.5) @ "y"


@gf.gen
def branching(x):
    c = gf.bernoulli(0.5) @ "c"
    if bool(c):
        return gf.normal(x, 2.0) @ "left"
    return gf.gamma(2.0, 1.0) @ ("right", 0)


@gf.gen
def _elem(x, s):
    return gf.normal(x * s, 1.0) @ "v"


@gf.gen
def mapped(xs):
    s = gf.normal(0.0, 1.0) @ "slope"
    return gf.Map(_elem, in_dims=(0, None))(xs, s) @ "ys"


@gf.gen
def _step(t, x):
    return gf.normal(x, 1.0) @ "x"


@gf.gen
def unfolded(x0):
    return gf.Unfold(_step)(3, x0) @ "chain"


@gf.gen
def _b0(x):
    return gf.normal(x, 1.0) @ "u"


@gf.gen
def _b1(x):
    return gf.uniform(x - 1.0, x + 1.0) @ "u"


@gf.gen
def switched(x):
    k = gf.categorical(torch.tensor([0.5, 0.5])) @ "k"
    return gf.Switch(_b0, _b1)(k, x) @ "branch"


@gf.gen
def with_module(x):
    return gf.normal(_LINEAR(x.reshape(1)).squeeze(), 1.0) @ "out"


_LINEAR = torch.nn.Linear(1, 1, dtype=torch.float64)


def _models() -> list:
    """(model, args) pairs, built inside the test (float64, the fixture's default dtype)."""
    return [
        (nested, (torch.tensor(0.3),)),
        (branching, (torch.tensor(-0.2),)),
        (mapped, (torch.linspace(-1.0, 1.0, 5),)),
        (unfolded, (torch.tensor(0.1),)),
        (switched, (torch.tensor(0.7),)),
        (with_module, (torch.tensor(0.4),)),
        (nested, (torch.tensor(-1.5),)),
        (mapped, (torch.linspace(0.0, 2.0, 4),)),
    ]


def _addrs(tr: gf.Trace) -> frozenset:
    return frozenset(tr.choices.addresses())


def _worker(idx: int, model, args, reference, iters: int, errors: list) -> None:
    ref_choices, ref_weight, allowed = reference
    try:
        for _ in range(iters):
            # (1) deterministic: generate with full constraints, exactly as single-threaded
            tr, w = model.generate(args, ref_choices)
            assert torch.equal(w, ref_weight), (idx, "generate weight", w, ref_weight)
            assert torch.equal(tr.score, ref_weight)
            # (2) simulate: own addresses only, score == assess
            sim = model.simulate(args)
            addrs = _addrs(sim)
            assert addrs in allowed, (idx, "addresses", sorted(map(repr, addrs)))
            aw, _ = model.assess(args, sim.choices)
            assert torch.allclose(aw, sim.score, rtol=1e-12, atol=1e-12), (idx, aw, sim.score)
            # (3) update one choice
            addr, value = next(iter(sim.choices.items()))
            new_value = value + 0.0 if value.dtype == torch.bool else value
            new, uw, _, discard = sim.update({addr: new_value})
            assert torch.allclose(uw, new.score - sim.score, atol=1e-12)
            assert torch.equal(new[addr], new_value)
            # (4) regenerate everything: own addresses, finite score
            reg, _, _ = model.regenerate(sim, args, (gf.NoChange(),) * len(args), gf.selectall())
            assert _addrs(reg) in allowed
    except BaseException as err:  # noqa: BLE001 - reported by the main thread
        errors.append((idx, repr(err)))


def _allowed_addresses(model, args, n: int = 64) -> set:
    return {_addrs(model.simulate(args)) for _ in range(n)}


def test_eight_threads_get_exactly_their_own_traces():
    torch.manual_seed(11)
    references = []
    models = _models()
    for model, args in models:
        tr = model.simulate(args)
        w = model.generate(args, tr.choices)[1]
        references.append((tr.choices, w, _allowed_addresses(model, args)))
    errors: list = []
    threads = [
        threading.Thread(target=_worker, args=(i, m, a, ref, 40, errors))
        for i, ((m, a), ref) in enumerate(zip(models, references))
    ]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads every ~10 µs: interleave inside GFI calls
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(old)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors[:3]


def test_outside_a_body_in_another_thread_while_one_runs():
    """A thread that is not inside a body sees no handler even while another thread is."""
    seen: list = []
    inside = threading.Event()
    release = threading.Event()

    @gf.gen
    def slow(x):
        inside.set()
        release.wait(10)
        return gf.normal(x, 1.0) @ "x"

    t = threading.Thread(target=lambda: seen.append(slow.simulate((0.0,))))
    t.start()
    assert inside.wait(10)
    try:
        gf.normal(0.0, 1.0) @ "x"
    except gf.OutsideGenBodyError as err:
        seen.append(err)
    release.set()
    t.join(10)
    assert isinstance(seen[0], gf.OutsideGenBodyError)
    assert frozenset(seen[1].choices.addresses()) == {("x",)}


def test_parameters_of_one_function_from_many_threads():
    """The recursion guard of parameters() is per thread: each caller gets all of them."""
    with_module.simulate((torch.tensor(0.1),))
    expected = {id(p) for p in _LINEAR.parameters()}
    out: list = []

    def ask() -> None:
        for _ in range(200):
            out.append({id(p) for p in with_module.parameters()})

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 800 and all(s == expected for s in out)
