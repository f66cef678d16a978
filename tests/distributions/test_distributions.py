"""Tests of gfcomb/distributions/{continuous,discrete,multivariate,wrapper}.py.

What is checked, for every distribution:

- ``logpdf`` against scipy.stats (or a closed form) to 1e-10 relative in float64, with
  broadcasting between values and parameters; ``-inf`` (never NaN, with finite gradients)
  outside the support; gradients against finite differences (``torch.autograd.gradcheck``).
- every sampler: goodness of fit (KS test against the scipy CDF for continuous ones,
  chi-square against the pmf for discrete ones) when called directly with batched
  parameters, under ``vmap(randomness="different")`` with batched parameters, and under vmap
  with unbatched (closed-over) parameters -- the last one checks that vmap gives independent
  draws per element.
- reparameterized gradients: ``vmap(grad(sample))`` and ``grad(vmap(sample))`` against the
  exact implicit-reparameterization derivative ``dx/dθ = -∂θ F(x; θ) / p(x; θ)`` for the
  one-noise samplers (computed from scipy's CDF); Monte Carlo gradients of expectations for
  Beta, Student-t, Dirichlet and MvNormal; Gamma's against torch's ``rsample`` under the same
  seed.
- ``vmap(logpdf)`` and ``vmap(grad(logpdf))`` equal a per-element loop to 1e-12.
- ``check_args`` raises :class:`DistributionArgumentError` naming the argument, through the
  one table-driven routine of base.py, alike for Python numbers, one-element tensors and
  larger tensors; validation stays off under vmap/grad.
- value shapes: ``value_shape`` equals a sample's shape; constraints whose shape merely
  broadcasts are rejected by generate/assess/update (naming the address; per element under
  vmap), size-1 dimensions being the one leeway.
- cached constant parameters (Python numbers) give the tensor results and are never made
  under inference mode or grad; ``choice_gradients`` returns detached tensors with module
  parameters; trace pytrees re-flatten from their cache and survive placeholder leaves.

Statistical tests use fixed seeds and a p-value threshold of 1e-4: with the ~100 KS and
chi-square tests below, the chance that *some* test would fail for a correct sampler under a
fresh seed is about 1 % (each has a false-alarm rate of 1e-4); with the fixed seeds the
outcome is deterministic.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from torch.func import grad, grad_and_value, vmap

from gfcomb.core.errors import DistributionArgumentError
from gfcomb.distributions.continuous import (
    Beta,
    Cauchy,
    Exponential,
    Gamma,
    HalfCauchy,
    HalfNormal,
    InvGamma,
    Laplace,
    LogNormal,
    Normal,
    StudentT,
    Uniform,
    Weibull,
)
from gfcomb.distributions.discrete import (
    Bernoulli,
    Binomial,
    Categorical,
    Geometric,
    Poisson,
    UniformDiscrete,
)
from gfcomb.distributions.multivariate import Dirichlet, MvNormal
from gfcomb.distributions.wrapper import TorchDistribution

P_THRESHOLD = 1e-4  # false-alarm rate of each statistical test for a correct sampler
N_GOF = 20_000


@pytest.fixture(autouse=True)
def _float64_seeded():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1234)
    yield
    torch.set_default_dtype(old)


# ================================================================================ registry
@dataclass
class Spec:
    dist: Any
    params: list[tuple[Any, ...]]  # parameter sets (Python numbers or lists)
    ref: Callable[..., Any]  # params -> frozen scipy distribution


def _categorical_ref(probs: list[float]) -> Any:
    p = np.asarray(probs, dtype=float)
    return stats.rv_discrete(values=(np.arange(len(p)), p / p.sum()))


CONTINUOUS = {
    "normal": Spec(Normal(), [(0.0, 1.0), (-1.5, 0.3), (2.0, 5.0)], lambda m, s: stats.norm(m, s)),
    "uniform": Spec(
        Uniform(), [(0.0, 1.0), (-2.0, 3.5), (1e-3, 2e-3)], lambda a, b: stats.uniform(a, b - a)
    ),
    "beta": Spec(
        Beta(), [(2.0, 3.0), (0.5, 0.5), (10.0, 1.5), (0.2, 4.0)], lambda a, b: stats.beta(a, b)
    ),
    "gamma": Spec(
        Gamma(),
        [(2.0, 3.0), (0.5, 1.0), (10.0, 0.1), (0.1, 2.0)],
        lambda k, r: stats.gamma(k, scale=1 / r),
    ),
    "inv_gamma": Spec(
        InvGamma(), [(3.0, 2.0), (0.5, 1.0), (10.0, 0.1)], lambda k, r: stats.invgamma(k, scale=r)
    ),
    "exponential": Spec(
        Exponential(), [(2.0,), (0.1,), (10.0,)], lambda r: stats.expon(scale=1 / r)
    ),
    "laplace": Spec(Laplace(), [(1.0, 2.0), (-3.0, 0.1)], lambda m, s: stats.laplace(m, s)),
    "cauchy": Spec(Cauchy(), [(1.0, 2.0), (-3.0, 0.1)], lambda m, s: stats.cauchy(m, s)),
    "student_t": Spec(
        StudentT(),
        [(3.0, 1.0, 2.0), (0.5, 0.0, 1.0), (30.0, -1.0, 0.5)],
        lambda df, m, s: stats.t(df, m, s),
    ),
    "half_normal": Spec(HalfNormal(), [(2.0,), (0.1,)], lambda s: stats.halfnorm(scale=s)),
    "log_normal": Spec(
        LogNormal(), [(0.5, 0.5), (-1.0, 2.0)], lambda m, s: stats.lognorm(s=s, scale=math.exp(m))
    ),
    "half_cauchy": Spec(HalfCauchy(), [(2.0,), (0.3,)], lambda s: stats.halfcauchy(scale=s)),
    "weibull": Spec(
        Weibull(),
        [(2.0, 1.5), (0.5, 0.7), (3.0, 5.0)],
        lambda s, k: stats.weibull_min(c=k, scale=s),
    ),
}

DISCRETE = {
    "bernoulli": Spec(Bernoulli(), [(0.3,), (0.9,)], lambda p: stats.bernoulli(p)),
    "categorical": Spec(
        Categorical(), [([0.2, 0.3, 0.5],), ([1.0, 0.0, 3.0, 2.0],)], _categorical_ref
    ),
    "uniform_discrete": Spec(
        UniformDiscrete(), [(2, 7), (-3, 3), (0, 0)], lambda a, b: stats.randint(a, b + 1)
    ),
    "poisson": Spec(Poisson(), [(3.0,), (0.5,), (40.0,)], lambda r: stats.poisson(r)),
    "binomial": Spec(
        Binomial(), [(10.0, 0.3), (1.0, 0.5), (50.0, 0.9)], lambda n, p: stats.binom(int(n), p)
    ),
    "geometric": Spec(Geometric(), [(0.3,), (0.05,), (0.9,)], lambda p: stats.geom(p, loc=-1)),
}

UNIVARIATE = {**CONTINUOUS, **DISCRETE}

# one-noise monotone samplers: the pathwise derivative is the implicit one, -dF/dθ / p
IMPLICIT_REPARAM = [
    "normal",
    "uniform",
    "exponential",
    "laplace",
    "cauchy",
    "half_normal",
    "log_normal",
    "half_cauchy",
    "weibull",
    "gamma",
    "inv_gamma",
]

MV_COV = [[2.0, 0.6, -0.3], [0.6, 1.0, 0.2], [-0.3, 0.2, 0.5]]
MULTIVARIATE = {
    "mv_normal": (MvNormal(), ([1.0, -2.0, 0.5], MV_COV)),
    "dirichlet": (Dirichlet(), ([0.3, 1.0, 2.5],)),
}

ALL_DISTS = {**{k: (v.dist, v.params[0]) for k, v in UNIVARIATE.items()}, **MULTIVARIATE}


def _t(p: Any) -> torch.Tensor:
    return torch.as_tensor(p, dtype=torch.float64)


def _tensor_params(params: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(_t(p) for p in params)


def _expand(params: tuple[Any, ...], n: int) -> tuple[torch.Tensor, ...]:
    """Batched copies of the parameters, with a leading dim of size n."""
    return tuple(_t(p).expand(n, *_t(p).shape).clone() for p in params)


def _value_tensor(name: str, x: Any) -> torch.Tensor:
    if name in ("categorical", "uniform_discrete"):
        return torch.as_tensor(x, dtype=torch.int64)
    return torch.as_tensor(x, dtype=torch.float64)


def _assert_all_close(a: torch.Tensor, b: Any, rtol: float, atol: float) -> None:
    b = torch.as_tensor(np.asarray(b, dtype=float))
    a = a.to(torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    close = (a - b).abs() <= atol + rtol * b.abs()
    bad = ~(same_inf | close)
    assert not bool(bad.any()), f"mismatch:\n ours  {a[bad]}\n ref   {b[bad]}"


# ============================================================================ class attributes
EXPECTED_ATTRS = {
    "normal": (("loc", "scale"), False, True),
    "uniform": (("low", "high"), False, True),
    "beta": (("concentration1", "concentration0"), False, True),
    "gamma": (("concentration", "rate"), False, True),
    "inv_gamma": (("concentration", "rate"), False, True),
    "exponential": (("rate",), False, True),
    "laplace": (("loc", "scale"), False, True),
    "cauchy": (("loc", "scale"), False, True),
    "student_t": (("df", "loc", "scale"), False, True),
    "half_normal": (("scale",), False, True),
    "log_normal": (("loc", "scale"), False, True),
    "half_cauchy": (("scale",), False, True),
    "weibull": (("scale", "concentration"), False, True),
    "bernoulli": (("probs",), True, False),
    "categorical": (("probs",), True, False),
    "uniform_discrete": (("low", "high"), True, False),
    "poisson": (("rate",), True, False),
    "binomial": (("total_count", "probs"), True, False),
    "geometric": (("probs",), True, False),
    "mv_normal": (("mean", "cov"), False, True),
    "dirichlet": (("concentration",), False, True),
}


@pytest.mark.parametrize("name", sorted(ALL_DISTS))
def test_class_attributes(name: str) -> None:
    dist, _ = ALL_DISTS[name]
    param_names, discrete, reparam = EXPECTED_ATTRS[name]
    assert dist.name == name
    assert dist.param_names == param_names
    assert dist.discrete is discrete
    assert dist.reparameterized is reparam
    assert type(dist).__doc__ and type(dist).sample.__doc__ and type(dist).logpdf.__doc__


# ======================================================================= logpdf vs scipy.stats
def _points(name: str, frozen: Any) -> np.ndarray:
    q = np.array([1e-4, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.9999])
    x = frozen.ppf(q)
    if name in DISCRETE:
        lo, hi = frozen.support()
        x = np.unique(np.concatenate([x, [lo], [min(hi, lo + 3)]]))
    return x


@pytest.mark.parametrize("name", sorted(UNIVARIATE))
def test_logpdf_matches_scipy(name: str) -> None:
    spec = UNIVARIATE[name]
    for params in spec.params:
        frozen = spec.ref(*params)
        x = _points(name, frozen)
        ref = frozen.logpmf(x) if name in DISCRETE else frozen.logpdf(x)
        ours = spec.dist.logpdf(_value_tensor(name, x), *params)  # Python-number params
        _assert_all_close(ours, ref, rtol=1e-10, atol=1e-12)
        ours_t = spec.dist.logpdf(_value_tensor(name, x), *_tensor_params(params))
        _assert_all_close(ours_t, ref, rtol=1e-10, atol=1e-12)
        # a scalar value with scalar parameters gives a 0-d tensor
        assert spec.dist.logpdf(_value_tensor(name, x[0]), *params).shape == ()


@pytest.mark.parametrize("name", sorted(n for n in UNIVARIATE if n != "categorical"))
def test_logpdf_broadcasts_values_against_params(name: str) -> None:
    """Parameters of shape (P,) against values of shape (Q, P) give shape (Q, P)."""
    spec = UNIVARIATE[name]
    sets = spec.params
    cols = [_points(name, spec.ref(*p))[:4] for p in sets]
    n = min(len(c) for c in cols)
    x = np.stack([c[:n] for c in cols], axis=1)  # (Q, P)
    ref = np.stack(
        [
            (spec.ref(*p).logpmf if name in DISCRETE else spec.ref(*p).logpdf)(x[:, j])
            for j, p in enumerate(sets)
        ],
        axis=1,
    )
    params = tuple(_t([p[i] for p in sets]) for i in range(len(sets[0])))
    ours = spec.dist.logpdf(_value_tensor(name, x), *params)
    _assert_all_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_categorical_logpdf_closed_form_and_batching() -> None:
    cat = Categorical()
    probs = _t([[1.0, 0.0, 3.0, 2.0], [0.25, 0.25, 0.25, 0.25]])  # unnormalized row 0
    values = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]).T  # (4, 2) against batch shape (2,)
    lp = cat.logpdf(values, probs)
    expected = torch.log(probs / probs.sum(-1, keepdim=True)).T.gather(0, values)
    assert lp.shape == (4, 2)
    _assert_all_close(lp, expected.numpy(), rtol=1e-12, atol=0)
    assert cat.logpdf(torch.tensor(1), probs[0]).item() == -math.inf  # zero-prob category
    # float-valued indices are accepted
    assert cat.logpdf(2.0, probs[0]).item() == pytest.approx(math.log(0.5), rel=1e-12)


def test_mv_normal_logpdf_matches_scipy() -> None:
    mvn = MvNormal()
    rng = np.random.default_rng(0)
    for d in (1, 2, 5):
        a = rng.normal(size=(d, d))
        cov = a @ a.T + 0.5 * np.eye(d)
        mean = rng.normal(size=d)
        x = rng.normal(size=(7, d)) * 2
        ref = stats.multivariate_normal(mean, cov).logpdf(x)
        ours = mvn.logpdf(_t(x), _t(mean), _t(cov))
        _assert_all_close(ours, np.atleast_1d(ref), rtol=1e-10, atol=1e-12)
    # batch of (mean, cov) pairs against one value: one log density per event
    covs = np.stack([np.eye(2), [[2.0, 0.3], [0.3, 1.0]]])
    means = np.array([[0.0, 1.0], [1.0, -1.0]])
    x = np.array([0.5, 0.5])
    ours = mvn.logpdf(_t(x), _t(means), _t(covs))
    ref = [stats.multivariate_normal(means[i], covs[i]).logpdf(x) for i in range(2)]
    _assert_all_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_dirichlet_logpdf_matches_scipy() -> None:
    dirichlet = Dirichlet()
    for alpha in ([0.3, 1.0, 2.5], [5.0, 5.0], [1.0, 1.0, 1.0, 1.0], [0.5, 7.0, 1.5]):
        rv = stats.dirichlet(alpha)
        x = rv.rvs(size=6, random_state=1)
        ref = np.array([rv.logpdf(xi) for xi in x])
        ours = dirichlet.logpdf(_t(x), _t(alpha))
        _assert_all_close(ours, ref, rtol=1e-10, atol=1e-12)


# ============================================================================= out of support
OUT_OF_SUPPORT = [
    ("uniform", (-1.0, 3.0), [-1.5, 3.5]),
    ("beta", (2.0, 3.0), [-0.1, 1.1]),
    ("gamma", (2.0, 3.0), [-1.0, -1e-300]),
    ("inv_gamma", (3.0, 2.0), [0.0, -1.0]),
    ("exponential", (2.0,), [-0.1]),
    ("half_normal", (2.0,), [-1.0]),
    ("log_normal", (0.5, 0.5), [0.0, -1.0]),
    ("half_cauchy", (2.0,), [-1.0]),
    ("weibull", (2.0, 1.5), [-1.0]),
    ("bernoulli", (0.3,), [0.5, 2.0, -1.0]),
    ("categorical", ([0.2, 0.3, 0.5],), [-1, 3, 1.5]),
    ("uniform_discrete", (2, 7), [1, 8, 2.5]),
    ("poisson", (3.0,), [-1.0, 1.5]),
    ("binomial", (10.0, 0.3), [-1.0, 11.0, 2.5]),
    ("geometric", (0.3,), [-1.0, 0.5]),
]


@pytest.mark.parametrize(("name", "params", "values"), OUT_OF_SUPPORT)
def test_out_of_support_is_neg_inf_with_finite_gradients(name, params, values) -> None:
    dist = UNIVARIATE[name].dist
    params_t = tuple(_t(p).requires_grad_() for p in params)
    for v in values:
        value = torch.tensor(v)
        lp = dist.logpdf(value, *params_t)
        assert lp.item() == -math.inf, (name, v, lp)
        grads = torch.autograd.grad(lp, params_t, allow_unused=True)
        for g in grads:
            assert g is None or bool(torch.isfinite(g).all()), (name, v, grads)


def test_multivariate_out_of_support() -> None:
    d = Dirichlet()
    alpha = _t([1.0, 2.0, 3.0]).requires_grad_()
    for x in ([-0.1, 0.6, 0.5], [0.2, 0.2, 0.2], [1.5, -0.25, -0.25]):
        lp = d.logpdf(_t(x), alpha)
        assert lp.item() == -math.inf
        (g,) = torch.autograd.grad(lp, alpha)
        assert bool(torch.isfinite(g).all())


BOUNDARY = [  # (name, params, value, expected log density): finite with finite gradients
    ("bernoulli", (1.0,), 1.0, 0.0),
    ("bernoulli", (0.0,), 0.0, 0.0),
    ("binomial", (5.0, 0.0), 0.0, 0.0),
    ("binomial", (5.0, 1.0), 5.0, 0.0),
    ("poisson", (0.0,), 0.0, 0.0),
    ("geometric", (1.0,), 0.0, 0.0),
    ("gamma", (1.0, 2.0), 0.0, math.log(2.0)),
    ("exponential", (2.0,), 0.0, math.log(2.0)),
    ("beta", (1.0, 2.0), 0.0, math.log(2.0)),
    ("beta", (2.0, 1.0), 1.0, math.log(2.0)),
    ("uniform", (0.0, 2.0), 2.0, -math.log(2.0)),
    ("weibull", (2.0, 1.0), 0.0, -math.log(2.0)),
]


@pytest.mark.parametrize(("name", "params", "value", "expected"), BOUNDARY)
def test_boundary_values_finite_with_finite_gradients(name, params, value, expected) -> None:
    dist = UNIVARIATE[name].dist
    params_t = tuple(_t(p).requires_grad_() for p in params)
    lp = dist.logpdf(torch.tensor(value), *params_t)
    assert lp.item() == pytest.approx(expected, abs=1e-12)
    for g in torch.autograd.grad(lp, params_t, allow_unused=True):
        assert g is None or bool(torch.isfinite(g).all()), (name, g)


# ======================================================================= logpdf gradients (FD)
CONTINUOUS_PARAMS = {  # indices of the real-valued parameters of the discrete distributions
    "bernoulli": [0],
    "categorical": [0],
    "uniform_discrete": [],
    "poisson": [0],
    "binomial": [1],
    "geometric": [0],
}


@pytest.mark.parametrize("name", sorted(UNIVARIATE))
def test_logpdf_gradcheck(name: str) -> None:
    spec = UNIVARIATE[name]
    params = spec.params[0]
    frozen = spec.ref(*params)
    x = _points(name, frozen)[2:-2]
    if name in DISCRETE:
        value = _value_tensor(name, x)
        cont = CONTINUOUS_PARAMS[name]  # differentiate in the continuous parameters only
        if not cont:
            pytest.skip("no continuous parameter")

        def f(*ps: torch.Tensor) -> torch.Tensor:
            full = list(_tensor_params(params))
            for i, p in zip(cont, ps):
                full[i] = p
            return spec.dist.logpdf(value, *full)

        inputs = tuple(_t(params[i]).requires_grad_() for i in cont)
    else:

        def f(v: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
            return spec.dist.logpdf(v, *ps)

        inputs = (_t(x).requires_grad_(),) + tuple(_t(p).requires_grad_() for p in params)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_multivariate_logpdf_gradcheck() -> None:
    a = _t([[1.0, 0.2, 0.0], [0.3, 1.2, -0.4], [0.0, 0.5, 0.8]]).requires_grad_()
    mean = _t([0.5, -1.0, 2.0]).requires_grad_()
    x = _t([[0.0, 0.0, 0.0], [1.0, -1.0, 1.5]]).requires_grad_()

    def f(x, mean, a):
        return MvNormal().logpdf(x, mean, a @ a.T + 0.1 * torch.eye(3))

    assert torch.autograd.gradcheck(f, (x, mean, a), eps=1e-6, atol=1e-6, rtol=1e-5)
    alpha = _t([0.7, 2.0, 3.0]).requires_grad_()
    xs = _t([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    assert torch.autograd.gradcheck(
        lambda al: Dirichlet().logpdf(xs, al), (alpha,), eps=1e-6, atol=1e-6, rtol=1e-5
    )


# ============================================================================ vmap of logpdf
def _batched_args(name: str, n: int = 6) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """n values and n parameter sets (cycling through the registry's sets), batched."""
    if name in MULTIVARIATE:
        dist, params = MULTIVARIATE[name]
        bp = _expand(params, n)
        if name == "mv_normal":
            bp = (bp[0] + torch.randn(n, 3), bp[1] * torch.linspace(0.5, 2.0, n)[:, None, None])
        else:
            bp = (bp[0] * torch.linspace(0.5, 2.0, n)[:, None],)
        values = vmap(dist.sample, randomness="different")(*bp)
        return values, bp
    spec = UNIVARIATE[name]
    same_shape = [s for s in spec.params if np.shape(s[0]) == np.shape(spec.params[0][0])]
    if name == "categorical":
        same_shape = [([0.2, 0.3, 0.5],), ([1.0, 0.0, 2.0],), ([0.1, 0.1, 5.0],)]
    sets = [same_shape[i % len(same_shape)] for i in range(n)]
    bp = tuple(torch.stack([_t(s[j]) for s in sets]) for j in range(len(sets[0])))
    pts = [_points(name, spec.ref(*s)) for s in sets]
    values = torch.stack([_value_tensor(name, p[(3 + i) % len(p)]) for i, p in enumerate(pts)])
    return values, bp


@pytest.mark.parametrize("name", sorted(ALL_DISTS))
def test_vmap_logpdf_equals_loop(name: str) -> None:
    dist = ALL_DISTS[name][0]
    values, bp = _batched_args(name)
    batched = vmap(dist.logpdf)(values, *bp)
    loop = torch.stack([dist.logpdf(values[i], *(p[i] for p in bp)) for i in range(len(values))])
    assert batched.shape == loop.shape == (len(values),)
    assert torch.allclose(batched, loop, rtol=0, atol=1e-12)
    # unbatched parameters (closed over) against batched values
    p0 = tuple(p[0] for p in bp)
    batched = vmap(lambda v: dist.logpdf(v, *p0))(values)
    loop = torch.stack([dist.logpdf(values[i], *p0) for i in range(len(values))])
    assert torch.allclose(batched, loop, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ALL_DISTS))
def test_vmap_grad_logpdf_equals_loop(name: str) -> None:
    dist = ALL_DISTS[name][0]
    values, bp = _batched_args(name)
    if name == "uniform_discrete":
        pytest.skip("no continuous parameter")
    argnums: tuple[int, ...]
    if dist.discrete:
        argnums = tuple(1 + i for i in CONTINUOUS_PARAMS[name])
    else:
        argnums = tuple(range(1 + len(bp)))
    g = grad(lambda v, *ps: dist.logpdf(v, *ps).sum(), argnums=argnums)
    batched = vmap(g)(values, *bp)
    for i in range(len(values)):
        single = g(values[i], *(p[i] for p in bp))
        for b, s in zip(batched, single):
            assert torch.allclose(b[i], s, rtol=0, atol=1e-12), (name, i)
            assert bool(torch.isfinite(s).all())


# ============================================================================ goodness of fit
def _draw(dist: Any, params: tuple[Any, ...], mode: str, n: int = N_GOF) -> torch.Tensor:
    """n draws: 'direct' (parameters expanded to a batch), 'vmap' (vmap over batched
    parameters), 'vmap_closed' (vmap over a dummy, parameters closed over, unbatched) or
    'vmap_mixed' (only the first parameter batched)."""
    if mode == "direct":
        return dist.sample(*_expand(params, n))
    if mode == "vmap":
        return vmap(dist.sample, randomness="different")(*_expand(params, n))
    if mode == "vmap_mixed":  # first parameter batched, the others closed over
        rest = _tensor_params(params)[1:]
        fn = vmap(lambda p0: dist.sample(p0, *rest), randomness="different")
        return fn(_expand(params[:1], n)[0])
    tp = _tensor_params(params)
    return vmap(lambda _: dist.sample(*tp), randomness="different")(torch.zeros(n))


MODES = ["direct", "vmap", "vmap_closed", "vmap_mixed"]


def _gof_cases() -> list[Any]:
    cases = []
    for name, spec in sorted(UNIVARIATE.items()):
        for i in range(len(spec.params)):
            cases.append(pytest.param(name, i, "direct", id=f"{name}-{i}-direct"))
        for mode in MODES[1:]:
            cases.append(pytest.param(name, 0, mode, id=f"{name}-0-{mode}"))
    return cases


def _chisquare_pvalue(samples: np.ndarray, frozen: Any) -> float:
    """Chi-square goodness of fit against a pmf; adjacent bins merged to expected >= 5."""
    n = len(samples)
    lo, hi = frozen.support()
    hi = min(hi, frozen.ppf(1 - 1e-12))
    ks = np.arange(lo, hi + 1)
    expected = n * frozen.pmf(ks)
    expected[-1] += n * frozen.sf(hi)  # the upper tail goes into the last bin
    observed = np.bincount((np.clip(samples, lo, hi) - lo).astype(int), minlength=len(ks))
    obs_bins, exp_bins = [], []
    acc_o = acc_e = 0.0
    for o, e in zip(observed, expected):
        acc_o += o
        acc_e += e
        if acc_e >= 5:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o = acc_e = 0.0
    if obs_bins:
        obs_bins[-1] += acc_o
        exp_bins[-1] += acc_e
    if len(obs_bins) < 2:
        return 1.0
    exp_arr = np.asarray(exp_bins)
    exp_arr *= n / exp_arr.sum()
    return float(stats.chisquare(obs_bins, exp_arr).pvalue)


@pytest.mark.parametrize(("name", "i", "mode"), _gof_cases())
def test_sampler_goodness_of_fit(name: str, i: int, mode: str) -> None:
    spec = UNIVARIATE[name]
    params = spec.params[i]
    frozen = spec.ref(*params)
    x = _draw(spec.dist, params, mode)
    assert x.shape == (N_GOF,)
    if name in ("categorical", "uniform_discrete"):
        assert x.dtype == torch.int64
    else:
        assert x.dtype == torch.float64
    assert bool(torch.isfinite(x.to(torch.float64)).all())
    xn = x.detach().numpy().astype(float)
    if name in DISCRETE:
        assert np.all(xn == np.floor(xn))
        lo, hi = frozen.support()
        assert xn.min() >= lo and xn.max() <= hi
        assert np.all(np.isfinite(frozen.logpmf(xn)))  # never a zero-probability value
        p = _chisquare_pvalue(xn, frozen)
    else:
        assert np.all(np.isfinite(spec.dist.logpdf(x, *params).numpy()))
        p = stats.kstest(xn, frozen.cdf).pvalue
    assert p > P_THRESHOLD, f"{name}{params} ({mode}): p = {p}"


@pytest.mark.parametrize("mode", MODES)
def test_mv_normal_goodness_of_fit(mode: str) -> None:
    mvn, (mean, cov) = MULTIVARIATE["mv_normal"]
    x = _draw(mvn, (mean, cov), mode).numpy()
    assert x.shape == (N_GOF, 3)
    mean_np, cov_np = np.asarray(mean), np.asarray(cov)
    se = np.sqrt(np.diag(cov_np) / N_GOF)
    assert np.all(np.abs(x.mean(0) - mean_np) < 5 * se)
    sd = np.sqrt(np.diag(cov_np))
    se_cov = np.sqrt((np.outer(sd, sd) ** 2 + cov_np**2) / N_GOF)
    assert np.all(np.abs(np.cov(x.T) - cov_np) < 5 * se_cov)
    rng = np.random.default_rng(7)
    for _ in range(3):
        a = rng.normal(size=3)
        proj = stats.norm(a @ mean_np, math.sqrt(a @ cov_np @ a))
        assert stats.kstest(x @ a, proj.cdf).pvalue > P_THRESHOLD


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha", [[0.3, 1.0, 2.5], [5.0, 5.0], [0.05, 0.1, 1.0, 3.0]])
def test_dirichlet_goodness_of_fit(alpha: list[float], mode: str) -> None:
    d = Dirichlet()
    x = _draw(d, (alpha,), mode)
    assert x.shape == (N_GOF, len(alpha))
    assert torch.allclose(x.sum(-1), torch.ones(N_GOF), atol=1e-12)
    assert bool((x > 0).all())
    assert bool(torch.isfinite(d.logpdf(x, _t(alpha))).all())
    a0 = sum(alpha)
    for k, a in enumerate(alpha):
        p = stats.kstest(x[:, k].numpy(), stats.beta(a, a0 - a).cdf).pvalue
        assert p > P_THRESHOLD, (alpha, k, p)


def test_batched_parameters_give_per_element_distributions() -> None:
    """One call with different parameters per element: each column has its own law."""
    locs = _t([-3.0, 0.0, 10.0])
    scales = _t([0.1, 1.0, 4.0])
    x = Normal().sample(locs.expand(N_GOF, 3), scales)
    for j in range(3):
        assert stats.kstest(x[:, j].numpy(), stats.norm(locs[j], scales[j]).cdf).pvalue > 1e-4
    probs = _t([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])
    c = vmap(Categorical().sample, randomness="different")(probs.expand(N_GOF, 2, 3))
    assert c.shape == (N_GOF, 2)
    assert bool((c[:, 1] != 0).all())
    frac = (c[:, 0] == 0).double().mean().item()
    assert abs(frac - 0.7) < 5 * math.sqrt(0.21 / N_GOF)


# ======================================================================== sample shapes, dtypes
@pytest.mark.parametrize("name", sorted(ALL_DISTS))
def test_vmap_sample_shapes(name: str) -> None:
    dist, params = ALL_DISTS[name]
    single = dist.sample(*params)
    batched = vmap(dist.sample, randomness="different")(*_expand(params, 5))
    assert batched.shape == (5, *single.shape)
    assert batched.dtype == single.dtype
    nested = vmap(vmap(dist.sample, randomness="different"), randomness="different")(
        *(p.expand(2, *p.shape) for p in _expand(params, 4))
    )
    assert nested.shape == (2, 4, *single.shape)
    # elements are not all equal (independent randomness per element)
    assert len(torch.unique(nested.reshape(8, -1), dim=0)) > 1


@pytest.mark.parametrize("name", sorted(ALL_DISTS))
def test_no_warnings_under_vmap_and_grad(name: str) -> None:
    """No fallback ("performance drop") or deprecation warnings from torch in any vmapped path:
    torch has no batching rule for the gamma gradient, and torch.binomial resizes outputs
    when only one argument is batched -- both are worked around."""
    dist, params = ALL_DISTS[name]
    bp = _expand(params, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = vmap(dist.sample, randomness="different")(*bp)
        vmap(lambda _: dist.sample(*_tensor_params(params)), randomness="different")(x)
        rest = _tensor_params(params)[1:]
        vmap(lambda p0: dist.sample(p0, *rest), randomness="different")(bp[0])
        if len(params) > 1:  # last parameter batched, the first closed over
            first = _tensor_params(params)[0]
            vmap(lambda *ps: dist.sample(first, *ps), randomness="different")(*bp[1:])
        vmap(dist.logpdf)(x, *bp)
        if dist.reparameterized:
            argnums = tuple(range(len(params)))
            vmap(grad(lambda *ps: dist.sample(*ps).sum(), argnums=argnums), randomness="different")(
                *bp
            )
            grad(lambda *ps: vmap(dist.sample, randomness="different")(*ps).sum(), argnums=argnums)(
                *bp
            )


@pytest.mark.parametrize("name", sorted(ALL_DISTS))
def test_float32_parameters(name: str) -> None:
    dist, params = ALL_DISTS[name]
    p32 = tuple(torch.as_tensor(p, dtype=torch.float32) for p in params)
    x = dist.sample(*p32)
    expect = torch.int64 if name in ("categorical", "uniform_discrete") else torch.float32
    assert x.dtype == expect
    lp = dist.logpdf(x, *p32)
    assert lp.dtype == torch.float32 and bool(torch.isfinite(lp).all())
    xs = vmap(dist.sample, randomness="different")(*(p.expand(100, *p.shape) for p in p32))
    assert bool(torch.isfinite(dist.logpdf(xs, *p32)).all())


def test_python_numbers_follow_tensor_dtype() -> None:
    x = Normal().sample(torch.zeros(3, dtype=torch.float32), 1.0)
    assert x.dtype == torch.float32 and x.shape == (3,)
    assert Normal().logpdf(0.0, 0.0, 1.0).dtype == torch.float64
    assert Gamma().sample(2, torch.tensor([1.0, 2.0])).shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(ALL_DISTS))
def test_samplers_on_cuda(name: str) -> None:
    dist, params = ALL_DISTS[name]
    pc = tuple(_t(p).cuda() for p in params)
    x = vmap(dist.sample, randomness="different")(*(p.expand(50, *p.shape) for p in pc))
    assert x.device.type == "cuda"
    lp = dist.logpdf(x, *pc)
    assert lp.device.type == "cuda" and bool(torch.isfinite(lp).all())
    if dist.reparameterized:
        g = vmap(grad(lambda *ps: dist.sample(*ps).sum()), randomness="different")(
            *(p.expand(50, *p.shape) for p in pc)
        )
        assert bool(torch.isfinite(g).all())


# ==================================================================== reparameterized gradients
def _implicit_grad(
    frozen_fn: Callable[..., Any], params: tuple[float, ...], j: int, x: np.ndarray
) -> np.ndarray:
    """-dF(x; θ)/dθ_j / p(x; θ) by central differences of scipy's cdf (or sf in the upper
    half, for precision)."""
    h = 1e-6 * max(1.0, abs(params[j]))
    up = list(params)
    dn = list(params)
    up[j] += h
    dn[j] -= h
    f0 = frozen_fn(*params)
    upper = f0.cdf(x) > 0.5
    d_cdf = (frozen_fn(*up).cdf(x) - frozen_fn(*dn).cdf(x)) / (2 * h)
    d_sf = -(frozen_fn(*up).sf(x) - frozen_fn(*dn).sf(x)) / (2 * h)
    return -np.where(upper, d_sf, d_cdf) / f0.pdf(x)


@pytest.mark.parametrize("how", ["vmap_grad", "grad_vmap"])
@pytest.mark.parametrize("name", IMPLICIT_REPARAM)
def test_pathwise_gradient_is_the_implicit_one(name: str, how: str) -> None:
    spec = CONTINUOUS[name]
    dist = spec.dist
    n = 200
    argnums = tuple(range(len(spec.params[0])))
    for params in spec.params[:2]:
        bp = _expand(params, n)
        if how == "vmap_grad":
            fn = grad_and_value(lambda *ps: dist.sample(*ps), argnums=argnums)
            grads, x = vmap(fn, randomness="different")(*bp)
        else:

            def total(*ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                xs = vmap(dist.sample, randomness="different")(*ps)
                return xs.sum(), xs

            grads, x = grad(total, argnums=argnums, has_aux=True)(*bp)
        xn = x.detach().numpy()
        frozen = spec.ref(*params)
        keep = (frozen.cdf(xn) > 1e-3) & (frozen.sf(xn) > 1e-3)
        assert keep.sum() > n // 2
        for j in argnums:
            expected = _implicit_grad(spec.ref, params, j, xn)
            got = grads[j].numpy()
            scale = np.abs(expected[keep]).max() + 1e-3
            # torch's gamma gradient (torch._standard_gamma_grad, which we reuse) is a
            # series/asymptotic approximation good to ~2e-4 relative
            rtol = 1e-3 if name in ("gamma", "inv_gamma") and j == 0 else 1e-4
            np.testing.assert_allclose(
                got[keep],
                expected[keep],
                rtol=rtol,
                atol=1e-6 * scale,
                err_msg=f"{name}{params} d/d{dist.param_names[j]}",
            )


def test_normal_pathwise_gradients_are_one_and_eps() -> None:
    n = 100
    loc, scale = _t(1.5).expand(n).clone(), _t(0.7).expand(n).clone()
    fn = grad_and_value(lambda m, s: Normal().sample(m, s), argnums=(0, 1))
    (dloc, dscale), x = vmap(fn, randomness="different")(loc, scale)
    assert torch.equal(dloc, torch.ones(n))
    assert torch.allclose(dscale, (x - loc) / scale, atol=1e-14)


def test_gamma_gradient_matches_torch_rsample_under_same_seed() -> None:
    conc = _t([0.3, 1.0, 2.5, 10.0]).requires_grad_()
    rate = _t([1.0, 0.5, 2.0, 3.0]).requires_grad_()
    torch.manual_seed(42)
    ours = Gamma().sample(conc, rate)
    g_ours = torch.autograd.grad(ours.sum(), (conc, rate))
    torch.manual_seed(42)
    ref = torch.distributions.Gamma(conc, rate).rsample()
    g_ref = torch.autograd.grad(ref.sum(), (conc, rate))
    assert torch.allclose(ours, ref, rtol=1e-14, atol=0)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    # and the same gradient through vmap(grad), without a per-element fallback
    fn = grad_and_value(lambda c: Gamma().sample(c, 1.0).sum())
    with torch.no_grad():
        gv, xv = vmap(fn, randomness="different")(conc.detach().expand(64, 4).clone())
    assert bool(torch.isfinite(gv).all()) and bool((gv > 0).all())


def _mc_gradient_check(per_sample_grads: torch.Tensor, expected: Any, what: str) -> None:
    g = per_sample_grads.detach().numpy()
    mean = g.mean(0)
    se = g.std(0) / math.sqrt(g.shape[0])
    expected = np.asarray(expected, dtype=float)
    assert np.all(np.abs(mean - expected) <= 5 * se + 1e-12), (what, mean, expected, se)


N_MC = 20_000


def test_beta_gradient_of_expectation() -> None:
    a, b = 2.0, 3.0
    fn = grad(lambda p, q: Beta().sample(p, q), argnums=(0, 1))
    ga, gb = vmap(fn, randomness="different")(*_expand((a, b), N_MC))
    _mc_gradient_check(ga, b / (a + b) ** 2, "dE[x]/da")
    _mc_gradient_check(gb, -a / (a + b) ** 2, "dE[x]/db")
    # small concentrations (log-gamma path)
    a, b = 0.2, 0.4
    ga, gb = vmap(fn, randomness="different")(*_expand((a, b), N_MC))
    _mc_gradient_check(ga, b / (a + b) ** 2, "dE[x]/da small")
    _mc_gradient_check(gb, -a / (a + b) ** 2, "dE[x]/db small")


def test_student_t_gradient_of_expectation() -> None:
    df, loc, scale = 10.0, 0.5, 2.0
    fn = grad(lambda *p: StudentT().sample(*p) ** 2, argnums=(0, 1, 2))
    gdf, gloc, gscale = vmap(fn, randomness="different")(*_expand((df, loc, scale), N_MC))
    # E[x^2] = scale^2 df / (df - 2) + loc^2
    _mc_gradient_check(gdf, -2 * scale**2 / (df - 2) ** 2, "d/ddf")
    _mc_gradient_check(gloc, 2 * loc, "d/dloc")
    _mc_gradient_check(gscale, 2 * scale * df / (df - 2), "d/dscale")


def test_inv_gamma_and_dirichlet_gradients_of_expectation() -> None:
    alpha = [0.5, 2.0, 1.5]
    a0 = sum(alpha)
    fn = grad(lambda al: Dirichlet().sample(al)[0])
    g = vmap(fn, randomness="different")(_expand((alpha,), N_MC)[0])
    expected = [(a0 - alpha[0]) / a0**2] + [-alpha[0] / a0**2] * 2  # d E[x_0] / d alpha_j
    _mc_gradient_check(g, expected, "dirichlet")
    # inverse gamma: E[y] = rate / (k - 1)
    k, r = 4.0, 3.0
    fn = grad(lambda kk, rr: InvGamma().sample(kk, rr), argnums=(0, 1))
    gk, gr = vmap(fn, randomness="different")(*_expand((k, r), N_MC))
    _mc_gradient_check(gk, -r / (k - 1) ** 2, "inv_gamma d/dk")
    _mc_gradient_check(gr, 1 / (k - 1), "inv_gamma d/drate")


def test_mv_normal_gradients() -> None:
    mvn, (mean, cov) = MULTIVARIATE["mv_normal"]
    a = _t([0.5, -1.0, 2.0])
    mean_t, cov_t = _t(mean), _t(cov)
    # x - mean does not depend on mean: d sum(x) / d mean = 1
    g_mean = vmap(grad(lambda m: mvn.sample(m, cov_t).sum()), randomness="different")(
        mean_t.expand(10, 3)
    )
    assert torch.allclose(g_mean, torch.ones(10, 3), atol=1e-14)
    # E[(a.x)^2] = a' cov a + (a.mean)^2  ->  d/dmean = 2 (a.mean) a,  d/dcov = a a'
    fn = grad(lambda m, c: (a @ mvn.sample(m, c)) ** 2, argnums=(0, 1))
    gm, gc = vmap(fn, randomness="different")(*_expand((mean, cov), N_MC))
    _mc_gradient_check(gm, 2 * float(a @ mean_t) * a.numpy(), "d/dmean")
    _mc_gradient_check(gc.reshape(N_MC, 9), np.outer(a, a).reshape(9), "d/dcov")


NON_REPARAM = sorted(n for n in ALL_DISTS if not ALL_DISTS[n][0].reparameterized)


@pytest.mark.parametrize("name", NON_REPARAM)
def test_non_reparameterized_samplers_run_under_grad(name: str) -> None:
    """A non-reparameterized sampler inside grad: no error, zero gradient."""
    dist, params = ALL_DISTS[name]
    first = _t(params[0])
    if name in ("uniform_discrete",):
        pytest.skip("integer-valued output")

    def f(p0: torch.Tensor) -> torch.Tensor:
        x = dist.sample(p0, *params[1:])
        return (x.to(p0.dtype) * 1.0).sum() + 0.0 * p0.sum()

    g = vmap(grad(f), randomness="different")(first.expand(4, *first.shape))
    assert torch.equal(g, torch.zeros_like(g))


# ================================================================================= check_args
BAD_ARGS = [
    ("normal", (0.0, -1.0), "scale"),
    ("normal", (0.0, 0.0), "scale"),
    ("normal", (math.nan, 1.0), "loc"),
    ("normal", (0.0, math.inf), "scale"),
    ("normal", (torch.zeros(2), torch.ones(3)), "scale"),
    ("uniform", (1.0, 1.0), "high"),
    ("uniform", (math.inf, 2.0), "low"),
    ("beta", (0.0, 1.0), "concentration1"),
    ("beta", (1.0, -2.0), "concentration0"),
    ("gamma", (-1.0, 1.0), "concentration"),
    ("gamma", (1.0, 0.0), "rate"),
    ("inv_gamma", (1.0, -1.0), "rate"),
    ("inv_gamma", (math.nan, 1.0), "concentration"),
    ("exponential", (0.0,), "rate"),
    ("exponential", (math.nan,), "rate"),
    ("laplace", (0.0, -1.0), "scale"),
    ("cauchy", (0.0, 0.0), "scale"),
    ("cauchy", (math.nan, 1.0), "loc"),
    ("student_t", (0.0, 0.0, 1.0), "df"),
    ("student_t", (1.0, 0.0, -1.0), "scale"),
    ("student_t", (1.0, math.inf, 1.0), "loc"),
    ("half_normal", (-1.0,), "scale"),
    ("log_normal", (0.0, -1.0), "scale"),
    ("half_cauchy", (0.0,), "scale"),
    ("weibull", (-1.0, 1.0), "scale"),
    ("weibull", (1.0, 0.0), "concentration"),
    ("bernoulli", (1.5,), "probs"),
    ("bernoulli", (-0.1,), "probs"),
    ("bernoulli", (math.nan,), "probs"),
    ("categorical", ([0.5, -0.1, 0.6],), "probs"),
    ("categorical", ([0.0, 0.0],), "probs"),
    ("categorical", (torch.tensor(0.5),), "probs"),
    ("categorical", ([0.5, math.inf],), "probs"),
    ("uniform_discrete", (3, 2), "high"),
    ("uniform_discrete", (0.5, 2), "low"),
    ("uniform_discrete", (0, math.inf), "high"),
    ("poisson", (-1.0,), "rate"),
    ("poisson", (math.inf,), "rate"),
    ("binomial", (-1.0, 0.5), "total_count"),
    ("binomial", (2.5, 0.5), "total_count"),
    ("binomial", (3.0, 1.5), "probs"),
    ("geometric", (0.0,), "probs"),
    ("geometric", (1.5,), "probs"),
    ("mv_normal", ([0.0, 0.0], [[1.0, 0.0], [0.0, -1.0]]), "cov"),
    ("mv_normal", ([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]]), "cov"),
    ("mv_normal", ([0.0, 0.0], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "cov"),
    ("mv_normal", ([0.0, 0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]]), "cov"),
    ("mv_normal", (0.0, [[1.0]]), "mean"),
    ("mv_normal", ([math.nan, 0.0], [[1.0, 0.0], [0.0, 1.0]]), "mean"),
    ("mv_normal", ([0.0, 0.0], [[1.0, math.nan], [0.0, 1.0]]), "cov"),
    ("mv_normal", (torch.zeros(3, 2), torch.eye(2).expand(4, 2, 2)), "cov"),
    ("dirichlet", ([1.0, 0.0],), "concentration"),
    ("dirichlet", (torch.tensor(1.0),), "concentration"),
    ("dirichlet", ([1.0, math.nan],), "concentration"),
]


@pytest.mark.parametrize(("name", "params", "arg"), BAD_ARGS)
def test_check_args_names_the_argument(name: str, params: tuple[Any, ...], arg: str) -> None:
    dist = ALL_DISTS[name][0]
    with pytest.raises(DistributionArgumentError) as info:
        dist.check_args(*params)
    msg = str(info.value)
    assert f"'{arg}'" in msg or f"{arg}:" in msg, msg
    assert name in msg


@pytest.mark.parametrize("name", sorted(ALL_DISTS))
def test_check_args_accepts_good_params_and_checks_arity(name: str) -> None:
    dist, params = ALL_DISTS[name]
    dist.check_args(*params)
    dist.check_args(*_tensor_params(params))
    with pytest.raises(DistributionArgumentError, match=name):
        dist.check_args(*params, 1.0)


# ================================================================================ torch wrapper
def test_torch_wrapper_matches_builtin_logpdf() -> None:
    tn = TorchDistribution(torch.distributions.Normal)
    assert tn.name == "normal" and tn.param_names == ("loc", "scale")
    assert tn.reparameterized and not tn.discrete
    x = torch.linspace(-3, 3, 11)
    assert torch.allclose(tn.logpdf(x, 0.5, 2.0), Normal().logpdf(x, 0.5, 2.0), atol=1e-14)
    lg = TorchDistribution(torch.distributions.LogNormal)
    assert lg.name == "log_normal"
    assert torch.allclose(lg.logpdf(1.7, 0.5, 0.5), LogNormal().logpdf(1.7, 0.5, 0.5))
    # vmap of logpdf
    locs = torch.randn(5)
    assert torch.allclose(
        vmap(tn.logpdf, in_dims=(0, 0, None))(x[:5], locs, 2.0),
        Normal().logpdf(x[:5], locs, 2.0),
        atol=1e-14,
    )


def test_torch_wrapper_sampling_outside_vmap_is_reparameterized() -> None:
    tn = TorchDistribution(torch.distributions.Normal)
    loc = _t(1.0).requires_grad_()
    scale = _t(2.0).requires_grad_()
    x = tn.sample(loc, scale)
    dl, ds = torch.autograd.grad(x, (loc, scale))
    assert dl.item() == 1.0
    assert ds.item() == pytest.approx(((x - loc) / scale).item())
    assert tn.sample(torch.zeros(3), 1.0).shape == (3,)


def test_torch_wrapper_under_vmap_for_vmap_safe_samplers() -> None:
    pois = TorchDistribution(torch.distributions.Poisson)
    assert pois.discrete and not pois.reparameterized and pois.name == "poisson"
    x = vmap(pois.sample, randomness="different")(torch.full((N_GOF,), 3.0))
    assert x.shape == (N_GOF,)
    assert _chisquare_pvalue(x.numpy(), stats.poisson(3.0)) > P_THRESHOLD
    nrm = TorchDistribution(torch.distributions.Normal, reparameterized=False)
    y = vmap(nrm.sample, randomness="different", in_dims=(0, None))(torch.zeros(N_GOF), 1.0)
    assert stats.kstest(y.numpy(), stats.norm().cdf).pvalue > P_THRESHOLD
    cat = TorchDistribution(torch.distributions.Categorical)
    assert cat.discrete and cat.name == "categorical"
    c = vmap(cat.sample, randomness="different")(_t([0.2, 0.8]).expand(1000, 2))
    assert c.dtype == torch.int64 and c.shape == (1000,)


def test_torch_wrapper_optional_params_and_check_args() -> None:
    st = TorchDistribution(torch.distributions.StudentT)
    assert st.param_names == ("df", "loc", "scale")
    st.check_args(3.0)
    st.check_args(3.0, 0.0, 1.0)
    ref = stats.t(3.0).logpdf(0.7)
    assert st.logpdf(0.7, 3.0).item() == pytest.approx(ref, rel=1e-12)
    with pytest.raises(DistributionArgumentError, match="scale"):
        TorchDistribution(torch.distributions.Normal).check_args(0.0, -1.0)
    with pytest.raises(DistributionArgumentError, match="normal"):
        TorchDistribution(torch.distributions.Normal).check_args(0.0)
    with pytest.raises(DistributionArgumentError, match="'loc'"):
        TorchDistribution(torch.distributions.Normal).check_args(math.nan, 1.0)
    bern = TorchDistribution(torch.distributions.Bernoulli)
    assert bern.discrete
    assert bern.logpdf(1.0, 0.3).item() == pytest.approx(math.log(0.3), rel=1e-12)
    with pytest.raises(TypeError):
        TorchDistribution(Normal)  # type: ignore[arg-type]
    custom = TorchDistribution(torch.distributions.Gumbel, name="my_gumbel")
    assert custom.name == "my_gumbel" and repr(custom).startswith("TorchDistribution(")


# ======================================================= table-driven validation (base.py)
def test_every_builtin_declares_its_constraints_in_the_table() -> None:
    from gfcomb.distributions.methods import DistributionMethods
    from gfcomb.distributions.params import Constraint

    for name, (dist, _) in ALL_DISTS.items():
        assert len(dist.param_constraints) == len(dist.param_names), name
        assert all(isinstance(c, Constraint) for c in dist.param_constraints), name
        # one shared check routine: no distribution re-implements check_args
        assert type(dist).check_args is DistributionMethods.check_args, name


def _as_vector(p: Any, n: int = 2) -> torch.Tensor:
    """A tensor of ``n`` copies of ``p`` (batch dim in front): takes the tensor check path,
    not the one-element ``.item()`` path."""
    t = _t(p)
    return t.expand(n, *t.shape).clone()


NUMBER_BAD_ARGS = [  # the cases that are about values, not shapes
    c for c in BAD_ARGS
    if c[0] != "mv_normal" and not any(isinstance(p, torch.Tensor) and p.dim() > 0 for p in c[1])
]


@pytest.mark.parametrize(("name", "params", "arg"), NUMBER_BAD_ARGS)
def test_number_scalar_and_vector_paths_name_the_same_argument(
        name: str, params: tuple[Any, ...], arg: str) -> None:
    """Python numbers, one-element tensors (read with .item()) and larger tensors take three
    paths through the shared check routine; all three name the same argument."""
    dist = ALL_DISTS[name][0]
    forms = [params, _tensor_params(params)]
    if dist.param_constraints and all(c.event_dim == 0 for c in dist.param_constraints):
        forms.append(tuple(_as_vector(p) for p in params))
    for form in forms:
        with pytest.raises(DistributionArgumentError) as info:
            dist.check_args(*form)
        msg = str(info.value)
        assert f"'{arg}'" in msg and name in msg, (form, msg)


def test_valid_mixed_number_and_tensor_parameters_pass() -> None:
    Normal().check_args(torch.zeros(3), 2.0)
    Normal().check_args(0.5, torch.full((3,), 2.0))
    Uniform().check_args(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]))
    Binomial().check_args(torch.tensor([3, 4]), 0.5)  # integer tensor
    UniformDiscrete().check_args(torch.tensor(1), 3)
    with pytest.raises(DistributionArgumentError, match="'high' must be > 'low'"):
        Uniform().check_args(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(DistributionArgumentError, match=r"loc: \(3,\), scale: \(2,\)"):
        Normal().check_args(torch.zeros(3), torch.ones(2))


def test_validation_is_off_under_vmap_and_grad() -> None:
    """Validation would need .item() (fails under vmap): inside transforms it is skipped."""
    scales = torch.tensor([1.0, -1.0, 2.0])
    tr = vmap(lambda s: Normal().simulate((0.0, s)), randomness="different")(scales)
    assert tr.value.shape == (3,) and bool(torch.isnan(tr.score[1]))
    g = grad(lambda s: Normal().assess((0.0, s), _cm(torch.tensor(0.3)))[0])(torch.tensor(-1.0))
    assert g.shape == ()
    with pytest.raises(DistributionArgumentError, match="'scale'"):
        Normal().simulate((0.0, -1.0))


def _cm(v: Any) -> Any:
    from gfcomb.core.choicemap import ChoiceMap

    return ChoiceMap.value(v)


def test_set_validation_off_skips_the_checks() -> None:
    from gfcomb.distributions.base import set_validation

    set_validation(False)
    try:
        tr = Normal().simulate((0.0, -1.0))
        assert bool(torch.isnan(tr.score))
    finally:
        set_validation(True)
    with pytest.raises(DistributionArgumentError):
        Normal().simulate((0.0, -1.0))


# ========================================== constant parameters: converted once, cached
def test_python_number_parameters_give_the_tensor_results() -> None:
    x = torch.linspace(-2, 2, 5)
    for scale in (1.0, 2.5):
        a = Normal().logpdf(x, 0.3, scale)
        b = Normal().logpdf(x, _t(0.3), _t(scale))
        assert torch.allclose(a, b, rtol=1e-14, atol=1e-14)
        torch.manual_seed(3)
        s1 = Normal().sample(torch.zeros(4), scale)
        torch.manual_seed(3)
        s2 = Normal().sample(torch.zeros(4), _t(scale))
        assert torch.allclose(s1, s2, rtol=1e-15, atol=0)
    ref = stats.norm(0.3, 2.5).logpdf(x.numpy())
    _assert_all_close(Normal().logpdf(x, 0.3, 2.5), ref, rtol=1e-12, atol=0)


def test_constant_cache_keeps_signed_zero_dtype_and_device_apart() -> None:
    from gfcomb.distributions.params import constant_tensor, constant_value

    pz = constant_tensor(0.0, torch.float64, None)
    nz = constant_tensor(-0.0, torch.float64, None)
    assert pz is not nz and math.copysign(1.0, float(nz)) == -1.0
    assert constant_tensor(0.5, torch.float32, None).dtype == torch.float32
    assert constant_tensor(0.5, torch.float64, None).dtype == torch.float64
    assert constant_value(constant_tensor(2.5, torch.float64, None)) == 2.5
    assert constant_value(torch.tensor(2.5)) is None  # not a cached constant


def test_constants_made_under_inference_mode_or_grad_are_not_cached() -> None:
    from gfcomb.distributions.params import constant_tensor, constant_value

    with torch.inference_mode():
        made = constant_tensor(0.123456, torch.float64, None)
    assert constant_value(made) is None  # not cached: an inference tensor would leak out
    after = constant_tensor(0.123456, torch.float64, None)
    assert after is not made and not after.is_inference()

    seen: list[torch.Tensor] = []

    def f(loc: torch.Tensor) -> torch.Tensor:
        seen.append(constant_tensor(0.654321, torch.float64, None))
        return Normal().logpdf(torch.tensor(0.1), loc, 0.654321)

    g = grad(f)(torch.tensor(0.2))
    assert g.item() == pytest.approx((0.1 - 0.2) / 0.654321 ** 2, rel=1e-12)
    # a constant first made under grad is not kept (it would be a wrapped tensor)
    assert constant_value(seen[0]) is None
    kept = constant_tensor(0.654321, torch.float64, None)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(kept)
    # and one made under inference mode does not break autograd afterwards
    with torch.inference_mode():
        Normal().simulate((0.0, 0.777))
    loc = torch.tensor(0.0, requires_grad=True)
    (lp,) = torch.autograd.grad(Normal().logpdf(torch.tensor(0.5), loc, 0.777), loc)
    assert lp.item() == pytest.approx(0.5 / 0.777 ** 2, rel=1e-12)


# ================================================== value shapes and constraint shapes
def test_value_shape_is_the_shape_of_a_sample() -> None:
    for name, (dist, params) in ALL_DISTS.items():
        for form in (params, _expand(params, 3)):
            sample = dist.sample(*form)
            assert dist.value_shape(_tensor_params(form)) == tuple(sample.shape), name
            assert dist.value_shape(form) == tuple(sample.shape), name
    assert Normal().value_shape((torch.zeros(3, 1), torch.ones(4))) == (3, 4)


WRONG_SHAPES = [  # (name, params, a constraint of a wrong shape)
    ("normal", (0.0, 1.0), torch.zeros(3)),
    ("normal", (torch.zeros(3), 1.0), torch.tensor(0.0)),
    ("normal", (torch.zeros(3), 1.0), torch.zeros(2, 3)),
    ("bernoulli", (0.3,), torch.ones(2)),
    ("categorical", ([0.2, 0.8],), torch.tensor([0, 1])),
    ("mv_normal", (torch.zeros(2), torch.eye(2)), torch.zeros(3)),
    ("mv_normal", (torch.zeros(2), torch.eye(2)), torch.zeros(4, 2)),
    ("dirichlet", ([1.0, 2.0, 3.0],), torch.full((2, 3), 1 / 3)),
]


@pytest.mark.parametrize(("name", "params", "value"), WRONG_SHAPES)
def test_wrong_shaped_constraints_are_rejected(name: str, params: Any, value: Any) -> None:
    import gfcomb as gf

    dist = ALL_DISTS[name][0]
    with pytest.raises(DistributionArgumentError, match=r"does not fit the parameters") as info:
        dist.generate(params, _cm(value))
    assert name in str(info.value) and str(tuple(value.shape)) in str(info.value)
    with pytest.raises(DistributionArgumentError):
        dist.assess(params, _cm(value))
    tr = dist.simulate(params)
    with pytest.raises(DistributionArgumentError):
        dist.update(tr, params, (gf.UnknownChange(),) * len(params), _cm(value))

    @gf.gen
    def model():
        return dist(*params) @ ("a", "x")

    mtr = model.simulate(())
    snap = mtr.score.clone()
    for call in (lambda: model.generate((), {("a", "x"): value}),
                 lambda: model.assess((), {("a", "x"): value}),
                 lambda: model.update(mtr, (), (), {("a", "x"): value})):
        with pytest.raises(DistributionArgumentError) as info:
            call()
        assert info.value.address == ("a", "x") and "('a', 'x')" in str(info.value)
    assert torch.equal(mtr.score, snap)


def test_size_one_dimensions_are_the_one_leeway() -> None:
    # () for a (1,)-valued normal and (1,) for a scalar one: same single value, scored once
    _, w = Normal().generate((torch.zeros(1), 1.0), _cm(torch.tensor(0.5)))
    assert w.item() == pytest.approx(stats.norm(0, 1).logpdf(0.5), rel=1e-12)
    _, w = Normal().generate((0.0, 1.0), _cm(torch.tensor([0.5])))
    assert w.item() == pytest.approx(stats.norm(0, 1).logpdf(0.5), rel=1e-12)
    tr, w = Normal().generate((torch.zeros(3), 1.0), _cm(torch.tensor([0.1, 0.2, 0.3])))
    assert w.item() == pytest.approx(stats.norm(0, 1).logpdf([0.1, 0.2, 0.3]).sum(), rel=1e-12)


def test_rescoring_a_kept_value_under_arguments_of_another_shape_is_rejected() -> None:
    import gfcomb as gf

    tr = Normal().simulate((0.0, 1.0))
    with pytest.raises(DistributionArgumentError, match="kept value"):
        Normal().update(tr, (torch.zeros(3), 1.0), (gf.UnknownChange(), gf.NoChange()))
    new, w, _, _ = Normal().update(tr, (0.5, 2.0), (gf.UnknownChange(),) * 2)
    ref = stats.norm(0.5, 2.0).logpdf(tr.value.item()) - stats.norm(0, 1).logpdf(tr.value.item())
    assert w.item() == pytest.approx(ref, rel=1e-12)


def test_constraint_shapes_are_checked_per_element_under_vmap() -> None:
    locs = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    good = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])

    def gen_one(loc: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return Normal().generate((loc, 1.0), _cm(v))[1]

    w = vmap(gen_one)(locs, good)
    loop = torch.stack([gen_one(locs[i], good[i]) for i in range(3)])
    assert torch.allclose(w, loop, rtol=1e-14, atol=0)
    ref = stats.norm(locs.numpy(), 1.0).logpdf(good.numpy()).sum(-1)
    _assert_all_close(w, ref, rtol=1e-12, atol=0)
    with pytest.raises(DistributionArgumentError, match=r"shape \(3,\)"):
        vmap(gen_one)(locs, torch.zeros(3, 3))  # per element (3,) for a (2,)-valued normal


# ================================================================== choice_gradients
def test_choice_gradients_are_detached_with_module_parameters() -> None:
    import gfcomb as gf

    lin = torch.nn.Linear(1, 1)

    @gf.gen
    def model(x):
        z = gf.normal(lin(x.reshape(1)).squeeze(-1), 1.0) @ "z"
        return gf.normal(z, 0.5) @ "y"

    x = torch.tensor(0.7)
    tr = model.simulate((x,))
    arg_grads, values, grads = model.choice_gradients(tr, gf.select("z", "y"))
    for t in (arg_grads[0], values["z"], values["y"], grads["z"], grads["y"]):
        assert t.grad_fn is None and not t.requires_grad
    with torch.no_grad():
        mu = lin(x.reshape(1)).squeeze(-1)
    z, y = tr["z"].detach(), tr["y"].detach()
    w, b = lin.weight.detach().item(), lin.bias.detach().item()
    assert grads["z"].item() == pytest.approx((-(z - mu) + (y - z) / 0.25).item(), rel=1e-12)
    assert grads["y"].item() == pytest.approx((-(y - z) / 0.25).item(), rel=1e-12)
    assert arg_grads[0].item() == pytest.approx(((z - mu) * w).item(), rel=1e-12)
    assert lin.weight.grad is None and b == lin.bias.item()


# ===================================================================== trace pytrees
def test_trace_flatten_is_cached_and_survives_placeholders() -> None:
    from torch.utils import _pytree as pytree

    import gfcomb as gf

    @gf.gen
    def model(s):
        a = gf.normal(0.0, s) @ "a"
        return gf.mv_normal(torch.stack([a, a]), torch.eye(2)) @ ("b", 0)

    tr = model.simulate((torch.tensor(1.5),))
    leaves, spec = pytree.tree_flatten(tr)
    leaves2, spec2 = pytree.tree_flatten(tr)
    assert spec == spec2 and all(x is y for x, y in zip(leaves, leaves2))
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert torch.equal(rebuilt["b", 0], tr["b", 0]) and rebuilt.gen_fn is model
    assert pytree.tree_structure(rebuilt) == spec
    # torch broadcasts out_dims by rebuilding with placeholder leaves and re-flattening
    holder = pytree.tree_unflatten([0] * len(leaves), spec)
    assert pytree.tree_structure(holder) == spec
    # vmap returns a batched trace equal to a per-element loop under fixed values
    ss = torch.tensor([0.5, 1.0, 2.0])
    cm = gf.ChoiceMap({"a": 0.3, ("b", 0): torch.tensor([0.1, -0.2])})
    btr, bw = vmap(lambda s: model.generate((s,), cm))(ss)
    for i in range(3):
        tri, wi = model.generate((ss[i],), cm)
        assert torch.allclose(bw[i], wi, rtol=1e-14, atol=0)
        assert torch.allclose(btr.score[i], tri.score, rtol=1e-14, atol=0)
        assert torch.equal(btr["b", 0][i], tri["b", 0])


def test_a_custom_distribution_without_a_constraint_table_keeps_working() -> None:
    """Parameters default to REAL (finite); without declared event dims the value shape is
    unknown, so no shape check rejects a (d,)-valued choice with a (d, d) parameter."""
    from gfcomb.distributions.base import Distribution

    class DiagFromMatrix(Distribution):
        name = "diag_from_matrix"
        param_names = ("mean", "cov")
        reparameterized = True

        def sample(self, mean: Any, cov: Any) -> torch.Tensor:
            return mean + torch.diagonal(cov).sqrt() * torch.randn_like(mean)

        def logpdf(self, value: Any, mean: Any, cov: Any) -> torch.Tensor:
            return Normal().logpdf(value, mean, torch.diagonal(cov).sqrt())

    d = DiagFromMatrix()
    mean, cov = torch.zeros(3), torch.diag(torch.tensor([1.0, 4.0, 9.0]))
    v = torch.tensor([0.5, -1.0, 2.0])
    _, w = d.generate((mean, cov), _cm(v))
    ref = stats.norm(0, [1.0, 2.0, 3.0]).logpdf(v.numpy()).sum()
    assert w.item() == pytest.approx(ref, rel=1e-12)
    with pytest.raises(DistributionArgumentError, match="'cov' must be finite"):
        d.check_args(mean, cov * math.nan)


# ------------------------------------------------- Normal's fused sample-and-score path
@pytest.mark.parametrize("scale", [1.0, 0.3, "tensor"])
def test_normal_simulate_score_from_its_own_noise_equals_logpdf(scale):
    """simulate scores a Normal draw from the standardized noise; it must equal the log
    density of the value (float64, tight), and its reparameterized gradients must too."""
    torch.manual_seed(0)
    loc = torch.randn(5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if scale == "tensor" \
        else scale
    tr = Normal().simulate((loc, s))
    lp = Normal().logpdf(tr.value, loc, s).sum()
    torch.testing.assert_close(tr.score, lp, rtol=1e-13, atol=1e-13)
    params = [loc] + ([s] if scale == "tensor" else [])
    g_fused = torch.autograd.grad(tr.score + tr.value.sum(), params, retain_graph=True)
    g_plain = torch.autograd.grad(lp + tr.value.sum(), params)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_normal_subclass_with_its_own_sampler_is_not_fused():
    class Shifted(Normal):
        def sample(self, loc, scale):
            return super().sample(loc, scale) + 100.0

    assert Normal._fused and not Shifted._fused
    tr = Shifted().simulate((torch.tensor(0.0), 1.0))
    assert tr.value > 50
    torch.testing.assert_close(tr.score, Normal().logpdf(tr.value, 0.0, 1.0))


def test_normal_log_normalizer_cache_sees_in_place_changes_and_keeps_gradients():
    """The Normal's −log σ − log(2π)/2 is cached per plain σ tensor; an in-place change of σ
    must be seen, and a σ that requires grad must still get its gradient."""
    x = torch.tensor([0.3, -1.2], dtype=torch.float64)
    sigma = torch.tensor(0.5, dtype=torch.float64)
    expected = stats.norm(0.0, 0.5).logpdf(x.numpy())
    np.testing.assert_allclose(Normal().logpdf(x, 0.0, sigma).numpy(), expected, rtol=1e-12)
    sigma.mul_(4.0)  # now 2.0, same tensor object
    np.testing.assert_allclose(Normal().logpdf(x, 0.0, sigma).numpy(),
                               stats.norm(0.0, 2.0).logpdf(x.numpy()), rtol=1e-12)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(Normal().logpdf(x, 0.0, s).sum(), s)
    # d/ds Σ log N(x; 0, s) = Σ (x² / s³ − 1 / s)
    torch.testing.assert_close(g, (x ** 2 / 0.7 ** 3 - 1 / 0.7).sum(), rtol=1e-12, atol=1e-12)


def test_normal_scale_made_in_inference_mode_is_used_outside_it():
    """An inference-mode tensor has no version counter: the log-normalizer cache must not
    ask it for one (it is recomputed)."""
    with torch.inference_mode():
        sigma = torch.tensor(0.5, dtype=torch.float64)
    x = torch.tensor([0.1, 2.0], dtype=torch.float64)
    for _ in range(2):
        np.testing.assert_allclose(Normal().logpdf(x, 0.0, sigma).numpy(),
                                   stats.norm(0.0, 0.5).logpdf(x.numpy()), rtol=1e-12)
    tr = Normal().simulate((torch.zeros(2, dtype=torch.float64), sigma))
    torch.testing.assert_close(tr.score, Normal().logpdf(tr.value, 0.0, sigma).sum())


def test_mv_normal_simulate_score_from_its_own_noise_equals_logpdf():
    """MvNormal.simulate scores the draw from its standardized noise (z = eps, no
    triangular solve); it must equal logpdf of the value, with equal gradients."""
    torch.manual_seed(1)
    mean = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 4, dtype=torch.float64)
    cov = (a @ a.T + 4 * torch.eye(4, dtype=torch.float64)).requires_grad_(True)
    tr = MvNormal().simulate((mean, cov))
    lp = MvNormal().logpdf(tr.value, mean, cov).sum()
    torch.testing.assert_close(tr.score, lp, rtol=1e-12, atol=1e-12)
    g_fused = torch.autograd.grad(tr.score + tr.value.sum(), (mean, cov), retain_graph=True)
    g_plain = torch.autograd.grad(lp + tr.value.sum(), (mean, cov))
    for x, y in zip(g_fused, g_plain):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    # the same draw as sample() under the same seed
    torch.manual_seed(3)
    v1 = MvNormal().simulate((mean, cov)).value
    torch.manual_seed(3)
    torch.testing.assert_close(v1, MvNormal().sample(mean, cov), rtol=0, atol=0)
