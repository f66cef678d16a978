"""Enumerative Gibbs against brute-force enumeration of small discrete models, batched over
Map elements and over chains."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import gfcomb as gf
from gfcomb.inference import ANY, gibbs, select_pattern

PC = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
W = 0.4
YS = torch.tensor([-1.2, 0.3, 1.9, 0.8], dtype=torch.float64)


@gf.gen
def point(_i, mus, w):
    z = gf.bernoulli(w) @ "z"
    gf.normal(torch.where(z > 0.5, mus[1], mus[0]), 1.0) @ "y"
    return z


@gf.gen
def mixture(n, coupled):
    c = gf.categorical(PC) @ "c"
    mus = torch.stack([torch.tensor(-1.0), 0.5 + c.to(torch.get_default_dtype())])
    zs = gf.Map(point, in_dims=(0, None, None))(torch.arange(n), mus, torch.tensor(W)) @ "zs"
    if coupled:  # a choice that depends on every element: the elements are no longer
        gf.normal(zs.sum(), 0.7) @ "total"  # conditionally independent


def observations(coupled=False, total=1.0):
    cm = gf.ChoiceMap({"zs": gf.ChoiceMap.stacked(gf.ChoiceMap({"y": YS}), len(YS))})
    return cm.merge(gf.ChoiceMap({"total": total})) if coupled else cm


def exact_joint(coupled=False, total=1.0):
    """{(c, z_0, ..., z_3): posterior probability} by enumeration."""
    normal = torch.distributions.Normal
    configs = list(itertools.product(range(3), *[(0, 1)] * len(YS)))
    lps = []
    for c, *z in configs:
        zt = torch.tensor(z, dtype=torch.float64)
        mu = torch.where(zt > 0.5, torch.tensor(0.5 + c), torch.tensor(-1.0))
        lp = math.log(PC[c]) + float((zt * math.log(W) + (1 - zt) * math.log(1 - W)).sum())
        lp += float(normal(mu, 1.0).log_prob(YS).sum())
        if coupled:
            lp += float(normal(zt.sum(), 0.7).log_prob(torch.tensor(total)))
        lps.append(lp)
    probs = torch.softmax(torch.tensor(lps), 0)
    return dict(zip(configs, probs.tolist()))


def chains_of(n_chains, coupled=False):
    obs = observations(coupled)
    return torch.func.vmap(lambda _: mixture.generate((len(YS), coupled), obs)[0],
                           randomness="different")(torch.zeros(n_chains))


def empirical(chains):
    cs = chains["c"].tolist()
    zs = chains["zs", :, "z"].long().tolist()
    counts: dict = {}
    for c, z in zip(cs, zs):
        key = (c, *z)
        counts[key] = counts.get(key, 0) + 1
    return {k: v / len(cs) for k, v in counts.items()}


def check_against_enumeration(chains, exact):
    n = chains.score.shape[0]
    emp = empirical(chains)
    tv = 0.5 * sum(abs(emp.get(k, 0.0) - p) for k, p in exact.items())
    # marginals of c and of each z_i within 4 standard errors
    for j in range(3):
        p = sum(v for k, v in exact.items() if k[0] == j)
        q = float((chains["c"] == j).double().mean())
        assert abs(q - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (j, q, p)
    for i in range(len(YS)):
        p = sum(v for k, v in exact.items() if k[1 + i] == 1)
        q = float(chains["zs", :, "z"][:, i].mean())
        assert abs(q - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (i, q, p)
    return tv


SEL = gf.select("c") | select_pattern(("zs", ANY, "z"))


def test_gibbs_chains_match_enumeration():
    chains = chains_of(2000)
    for _ in range(6):
        chains, accepted = gibbs(chains, SEL)
        assert accepted.shape == (2000,)
        assert bool(accepted.all())  # independent elements: exact block Gibbs, always taken
    tv = check_against_enumeration(chains, exact_joint())
    # 2,000 draws over 48 configurations: the sampling noise of the TV is ~0.05
    assert tv < 0.08


def test_gibbs_block_with_coupled_elements_is_mh_corrected_and_exact():
    chains = chains_of(2000, coupled=True)
    rates = []
    for _ in range(12):
        chains, accepted = gibbs(chains, SEL)
        rates.append(float(accepted.double().mean()))
    assert 0.05 < sum(rates) / len(rates) < 1.0  # some block proposals are rejected
    tv = check_against_enumeration(chains, exact_joint(coupled=True))
    assert tv < 0.08


def test_single_choice_is_drawn_from_its_exact_conditional():
    tr, _ = mixture.generate((len(YS), False), observations())
    tr, _, _, _ = tr.update({"c": torch.tensor(1), ("zs", 0, "z"): 1.0})
    chains = torch.func.vmap(lambda _: tr, randomness="different")(torch.zeros(4000))
    moved, accepted = gibbs(chains, gf.select(("zs", 2, "z")))
    assert bool(accepted.all())
    others = [0, 1, 3]
    assert torch.equal(moved["zs", :, "z"][:, others], chains["zs", :, "z"][:, others])
    assert torch.equal(moved["c"], chains["c"])
    # p(z_2 = 1 | rest) ∝ W N(y_2; 1.5, 1) against (1 - W) N(y_2; -1, 1)
    normal = torch.distributions.Normal
    a = math.log(W) + float(normal(1.5, 1.0).log_prob(YS[2]))
    b = math.log(1 - W) + float(normal(-1.0, 1.0).log_prob(YS[2]))
    p = 1 / (1 + math.exp(b - a))
    q = float(moved["zs", :, "z"][:, 2].mean())
    assert abs(q - p) < 4 * math.sqrt(p * (1 - p) / 4000)


def test_gibbs_on_one_trace_returns_bool_and_keeps_the_input():
    tr, _ = mixture.generate((len(YS), False), observations())
    before = tr["zs", :, "z"].clone()
    new, accepted = gibbs(tr, SEL)
    assert accepted is True
    assert torch.equal(tr["zs", :, "z"], before)  # not mutated
    assert torch.equal(new["zs", :, "y"], YS)  # observations untouched
    assert torch.isfinite(new.score)


@pytest.mark.slow
def test_one_long_gibbs_chain_matches_enumeration():
    tr, _ = mixture.generate((len(YS), True), observations(True))
    exact = exact_joint(coupled=True)
    counts: dict = {}
    n = 3000
    for _ in range(n):
        tr, _ = gibbs(tr, SEL)
        key = (int(tr["c"]), *tr["zs", :, "z"].long().tolist())
        counts[key] = counts.get(key, 0) + 1
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in exact.items())
    assert tv < 0.1


def test_support_is_inferred_or_given():
    @gf.gen
    def kinds():
        gf.uniform_discrete(2, 4) @ "u"
        gf.poisson(2.0) @ "k"
        gf.normal(0.0, 1.0) @ "x"

    torch.manual_seed(2)
    chains = torch.func.vmap(lambda _: kinds.simulate(()), randomness="different")(
        torch.zeros(3000))
    moved, _ = gibbs(chains, gf.select("u"))
    counts = torch.stack([(moved["u"] == v).double().mean() for v in (2, 3, 4)])
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.04)
    with pytest.raises(gf.ArgumentError, match="'k'.*support="):
        gibbs(chains, gf.select("k"))
    moved, _ = gibbs(chains, gf.select("k"), support={"k": 12})  # truncated: 0..11
    lp = torch.distributions.Poisson(2.0).log_prob(torch.arange(12.0))
    p = torch.softmax(lp, 0)
    emp = torch.stack([(moved["k"] == v).double().mean() for v in range(12)])
    assert torch.allclose(emp, p, atol=0.04)
    with pytest.raises(gf.ArgumentError, match="'x'"):
        gibbs(chains, gf.select("x"))
    with pytest.raises(gf.ArgumentError, match="selects no choice"):
        gibbs(chains, gf.select("nothing"))
    with pytest.raises(gf.ArgumentError, match="selection"):
        gibbs(chains, "u")


def test_categorical_block_in_a_map():
    probs = torch.tensor([0.2, 0.5, 0.3])
    means = torch.tensor([-2.0, 0.0, 2.0])
    ys = torch.tensor([-1.8, 0.4, 2.5, 1.0, -0.3])

    @gf.gen
    def elem(_i):
        k = gf.categorical(probs) @ "k"
        gf.normal(means[k], 1.0) @ "y"

    model = gf.Map(elem)
    obs = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": ys}), len(ys))
    chains = torch.func.vmap(lambda _: model.generate((torch.arange(5),), obs)[0],
                             randomness="different")(torch.zeros(3000))
    moved, accepted = gibbs(chains, select_pattern((ANY, "k")))
    assert bool(accepted.all())
    post = torch.softmax(torch.log(probs) + torch.distributions.Normal(
        means, 1.0).log_prob(ys.unsqueeze(-1)), -1)  # [5, 3], exact per element
    emp = torch.stack([(moved[:, "k"] == v).double().mean(0) for v in range(3)], -1)
    assert torch.allclose(emp, post, atol=0.04)


TRANS = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
HMM_MU = torch.tensor([-1.0, 1.0], dtype=torch.float64)
HMM_YS = torch.tensor([-0.5, 0.8, 1.2, -0.1], dtype=torch.float64)


@gf.gen
def hmm_step(_t, s):
    s = gf.categorical(TRANS[s]) @ "s"
    gf.normal(HMM_MU[s], 1.0) @ "y"
    return s


def hmm_marginals():
    """P(s_t = 1 | y) by enumeration of the 16 state paths."""
    normal = torch.distributions.Normal
    lps = {}
    for path in itertools.product((0, 1), repeat=len(HMM_YS)):
        prev, lp = 0, 0.0
        for t, s in enumerate(path):
            lp += math.log(TRANS[prev, s]) + float(normal(HMM_MU[s], 1.0).log_prob(HMM_YS[t]))
            prev = s
        lps[path] = lp
    z = torch.logsumexp(torch.tensor(list(lps.values())), 0)
    return [sum(math.exp(v - z) for k, v in lps.items() if k[t] == 1)
            for t in range(len(HMM_YS))]


@pytest.mark.parametrize("block", [None, True])
def test_gibbs_on_unfold_steps_matches_enumeration(block):
    """Unfold steps are coupled through the state: by default they move one by one (exact
    conditionals, always accepted); block=True makes one MH-corrected block move."""
    hmm = gf.Unfold(hmm_step)
    t_len = len(HMM_YS)
    obs = gf.ChoiceMap.stacked(gf.ChoiceMap({"y": HMM_YS}), t_len)
    chains = torch.func.vmap(lambda _: hmm.generate((t_len, torch.tensor(0)), obs)[0],
                             randomness="different")(torch.zeros(2000))
    rates = []
    for _ in range(8 if block is None else 30):
        chains, accepted = gibbs(chains, select_pattern((ANY, "s")), block=block)
        rates.append(float(accepted.double().mean()))
    if block is None:
        assert min(rates) == 1.0
    else:
        assert 0.05 < sum(rates) / len(rates) < 0.9
    emp = chains[:, "s"].double().mean(0)
    for t, p in enumerate(hmm_marginals()):
        assert abs(float(emp[t]) - p) < 4 * math.sqrt(p * (1 - p) / 2000) + 0.01
