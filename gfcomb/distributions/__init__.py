"""Distributions: generative functions with one choice at the empty address.

Parameter conventions follow ``torch.distributions``.  Every sampler and log-density is
written for ``torch.func.vmap(randomness="different")`` and any device, reparameterized where
the math allows.  ``TorchDistribution`` wraps any ``torch.distributions`` class.
"""

from gfcomb.distributions.base import ChoiceTrace, Distribution, set_validation
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

normal = Normal()
uniform = Uniform()
beta = Beta()
gamma = Gamma()
inv_gamma = InvGamma()
exponential = Exponential()
laplace = Laplace()
cauchy = Cauchy()
student_t = StudentT()
half_normal = HalfNormal()
half_cauchy = HalfCauchy()
log_normal = LogNormal()
weibull = Weibull()
bernoulli = Bernoulli()
flip = bernoulli
categorical = Categorical()
uniform_discrete = UniformDiscrete()
poisson = Poisson()
binomial = Binomial()
geometric = Geometric()
mv_normal = MvNormal()
dirichlet = Dirichlet()

ALL_DISTRIBUTIONS = (
    normal, uniform, beta, gamma, inv_gamma, exponential, laplace, cauchy, student_t,
    half_normal, half_cauchy, log_normal, weibull, bernoulli, categorical, uniform_discrete,
    poisson, binomial, geometric, mv_normal, dirichlet,
)


def __getattr__(name: str):  # the torch wrapper is imported lazily (its module may be absent)
    if name == "TorchDistribution":
        from gfcomb.distributions.wrapper import TorchDistribution

        return TorchDistribution
    raise AttributeError(name)


__all__ = [
    "ALL_DISTRIBUTIONS", "Bernoulli", "Beta", "Binomial", "Categorical", "Cauchy", "ChoiceTrace",
    "Dirichlet", "Distribution", "Exponential", "Gamma", "Geometric", "HalfCauchy", "HalfNormal",
    "InvGamma", "Laplace", "LogNormal", "MvNormal", "Normal", "Poisson", "StudentT",
    "TorchDistribution", "Uniform", "UniformDiscrete", "Weibull", "bernoulli", "beta",
    "binomial", "categorical", "cauchy", "dirichlet", "exponential", "flip", "gamma",
    "geometric", "half_cauchy", "half_normal", "inv_gamma", "laplace", "log_normal",
    "mv_normal", "normal", "poisson", "set_validation", "student_t", "uniform",
    "uniform_discrete", "weibull",
]
