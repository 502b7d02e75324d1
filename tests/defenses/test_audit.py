"""The canary audit: the one-run bound's maths, and gradient canaries planted in real DP-SGD rounds.

Soundness checks that could fail: no noise -> a large lower bound; strong noise -> about 0; never
above the accountant's epsilon beyond the stated confidence (over seeds); same secret -> same bound.
"""

import math

import numpy as np
import pytest
import torch

from defenses.accounting import epsilon
from defenses.audit_bound import (best_guess_bound, epsilon_lower_bound, gaussian_fit_estimate, gdp_guess_bound,
                                  p_value)
from defenses.base import Defense
from defenses.canaries import GradientCanaries
from defenses.dp_sgd import DPSGD
from defenses.randomness import SECRET_ENV
from tests.defenses.helpers import make_ctx, run_round, tiny

torch.set_num_threads(1)


# -- the bound ------------------------------------------------------------------------------------------------
def test_all_correct_guesses_without_delta_match_the_closed_form():
    """delta = 0, v = r: p(eps) = q^r, so the bound is the eps with q = beta^(1/r), i.e. log(q / (1 - q))."""
    r, beta = 50, 0.05
    q = beta ** (1 / r)
    assert epsilon_lower_bound(100, r, r, 0.0, beta) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)


def test_p_value_properties():
    assert p_value(1000, 100, 50, 0.0, 0.0) > 0.5  # half right is what a coin does
    ps = [p_value(1000, 100, 90, e, 1e-5) for e in (0.5, 1, 2, 4)]
    assert ps == sorted(ps)  # a larger eps explains more correct guesses
    assert p_value(1000, 100, 90, 1.0, 1e-3) > p_value(1000, 100, 90, 1.0, 0.0)  # delta only loosens
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0


def test_steinke_bound_agrees_with_jax_privacy_on_one_sided_guesses():
    """Our hand-written bound against Google DeepMind's (jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run)
    on the same k "in" guesses: the same p-value, hence the same epsilon."""
    from jax_privacy.auditing import CanaryScoreAuditor, Explicit

    rng = np.random.default_rng(3)
    m = 2000
    b = rng.random(m) < 0.5
    s = b * 1.5 + rng.normal(size=m)
    auditor = CanaryScoreAuditor(s[b], s[~b])
    for k in (20, 100, 400):
        t = float(np.sort(s)[::-1][k - 1])
        v = int(b[s >= t].sum())
        theirs = auditor.epsilon_one_run(0.05, 1e-5, threshold_strategy=Explicit(t))
        assert epsilon_lower_bound(m, k, v, 1e-5, 0.05) == pytest.approx(theirs, abs=1e-4)


def test_bound_holds_at_its_confidence_on_the_gaussian_mechanism():
    """Simulated white-box canaries under the Gaussian mechanism of known epsilon, 200 seeds:
    the bound exceeds the true (PLD) epsilon in at most ~5 % of them (binomial slack)."""
    z, m, delta = 1.0, 500, 1e-5
    true_eps = epsilon(z, 1.0, 1, delta, "pld")
    over, bounds = 0, []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        b = rng.random(m) < 0.5
        s = b + rng.normal(0, z, m)
        lb = best_guess_bound(s, b, delta, 0.95)["epsilon_lower"]
        bounds.append(lb)
        over += lb > true_eps
    assert over <= 20  # 5 % of 200 is 10; P[Bin(200, .05) > 20] < 1e-3
    assert np.median(bounds) > 0.2 * true_eps  # and it is not vacuous


def test_gdp_bound_holds_at_its_confidence_and_is_tighter_on_the_gaussian_mechanism():
    """The f-DP one-run bound on simulated canaries of a 4-fold Gaussian composition (exactly mu-GDP, so its
    hypothesis holds), 60 seeds: above the true (PLD) epsilon in at most ~5 % of them, and tighter than
    Steinke et al.'s bound on the same guesses. One guess count (5 % of m) keeps it fast; the grid is
    Bonferroni over such counts."""
    sigma, rounds, m, delta = 1.6, 4, 2000, 1e-5
    true_eps = epsilon(sigma, 1.0, rounds, delta, "pld")
    over, gdp, steinke = 0, [], []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        b = rng.random(m) < 0.5
        s = b * rounds + rng.normal(0, sigma * np.sqrt(rounds), m)
        lb = gdp_guess_bound(s, b, delta, 0.95, fractions=(0.05,))
        assert lb["gdp_correct"] <= lb["gdp_guesses"]
        gdp.append(lb["epsilon_lower_gdp"])
        steinke.append(best_guess_bound(s, b, delta, 0.95, fractions=(0.05,))["epsilon_lower"])
        over += gdp[-1] > true_eps
    assert over <= 8  # 5 % of 60 is 3; P[Bin(60, .05) > 8] < 0.01
    assert np.median(gdp) > 1.15 * np.median(steinke)
    assert np.median(gdp) > 0.35 * true_eps


def test_gdp_bound_no_signal_is_zero_and_perfect_guesses_are_large():
    rng = np.random.default_rng(0)
    b = rng.random(1000) < 0.5
    assert gdp_guess_bound(rng.normal(size=1000), b, 1e-5)["epsilon_lower_gdp"] < 0.5
    perfect = gdp_guess_bound(b * 1.0, b, 1e-5)
    assert perfect["epsilon_lower_gdp"] > best_guess_bound(b * 1.0, b, 1e-5)["epsilon_lower"] > 3
    assert perfect["gdp_correct"] == perfect["gdp_guesses"] > 0
    assert gdp_guess_bound(np.ones(10), np.ones(10, bool), 1e-5)["epsilon_lower_gdp"] == 0.0  # nothing to tell apart


def test_gaussian_fit_estimate_recovers_the_mechanism_and_is_no_bound():
    """Andrew et al.'s kind of estimate: on simulated mu-GDP canaries it lands near the true epsilon (either side)."""
    sigma, rounds, m, delta = 2.4, 4, 5000, 1e-5
    true_eps = epsilon(sigma, 1.0, rounds, delta, "pld")
    ests = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        b = rng.random(m) < 0.5
        r = gaussian_fit_estimate(b * rounds + rng.normal(0, sigma * np.sqrt(rounds), m), b, delta)
        assert r["mu_estimate"] == pytest.approx(2 / sigma, rel=0.1)
        ests.append(r["epsilon_estimate"])
    assert all(abs(e / true_eps - 1) < 0.1 for e in ests)
    rng = np.random.default_rng(0)
    b = rng.random(m) < 0.5
    assert gaussian_fit_estimate(rng.normal(size=m), b, delta)["epsilon_estimate"] < 0.3
    assert gaussian_fit_estimate(b * 1.0, b, delta)["epsilon_estimate"] == math.inf  # separated without noise
    assert gaussian_fit_estimate([1.0, 2.0], [True, False], delta) == {}  # no variance to fit


# -- gradient canaries in DP-SGD ------------------------------------------------------------------------------
class _Plant(Defense):
    """Calls the audit's client hook where fl.training does: after dp_sgd's setup."""

    def __init__(self, audit):
        self.audit = audit

    def setup(self, ctx):
        self.audit.client_setup(ctx)


def _audit_run(sigma: float, rounds: int = 3, m: int = 300, poisson: bool = False, seed: int = 0):
    model, task, data = tiny("vit", seed=seed)
    audit = GradientCanaries(canaries=m)
    audit.bind(seed=seed, clients=[0], delta=1e-5, confidence=0.95,
               defenses=[{"name": "dp_sgd", "params": {"poisson_sampling": poisson}}])
    state: dict = {}
    for rnd in range(1, rounds + 1):
        sent = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        ctx = make_ctx(model, task, data, batch_size=16, lr=1.0, state=state, server_round=rnd, local_steps=1)
        run_round(ctx, [DPSGD(noise_multiplier=sigma, max_grad_norm=1.0, poisson_sampling=poisson), _Plant(audit)])
        state = ctx.state
        received = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        audit.observe(rnd, 0, sent, received)  # what the server sees, nothing else
    return audit, ctx.metrics["epsilon"]


def test_canaries_are_planted_as_clipped_records(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "audit test")
    audit, _ = _audit_run(sigma=0.0, rounds=2)
    s, b = audit.scores()[0], audit.included(0)
    assert 0.3 < b.mean() < 0.7
    # no noise: an included canary's coordinate drops by lr * C / B per round (plus the data's own gradient)
    gap = s[b].mean() - s[~b].mean()
    assert gap == pytest.approx(2 * 1.0 * 1.0 / 16, rel=0.2)


def test_no_noise_gives_a_large_lower_bound_and_strong_noise_about_zero(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "audit test")
    clean, eps_clean = _audit_run(sigma=0.0)
    # every guess right: the most 300 canaries can certify at 95 % (about 3.3; the accountant says inf)
    assert math.isinf(eps_clean) and clean.result()["epsilon_lower"] > 3
    noisy, eps_noisy = _audit_run(sigma=30.0)
    assert noisy.result()["epsilon_lower"] < 0.5 and noisy.result()["epsilon_lower"] <= eps_noisy


def test_same_secret_same_bound_and_never_above_the_accountant(monkeypatch):
    results = []
    for secret in ("s1", "s1", "s2", "s3", "s4"):
        monkeypatch.setenv(SECRET_ENV, secret)
        audit, eps = _audit_run(sigma=0.8)
        r = audit.result()
        assert r["epsilon_lower"] <= eps and r["epsilon_lower_gdp"] <= eps
        results.append(r)
    assert results[0] == results[1]  # same config, seed and secret: the same bound, bit for bit
    assert results[0] != results[2]  # another secret draws other inclusions (the bound is a random variable)
    assert max(r["epsilon_lower"] for r in results) > 0.3  # sigma 0.8 is detectable


def test_poisson_sampled_canaries_also_audit(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "audit test")
    audit, eps = _audit_run(sigma=0.0, rounds=4, poisson=True)
    assert 0 < audit.result()["epsilon_lower"] <= eps


def test_audit_needs_dp_sgd_and_a_stable_secret(monkeypatch):
    a = GradientCanaries(canaries=10)
    with pytest.raises(ValueError, match="add a \\[\\[defenses\\]\\] entry"):
        a.bind(seed=0, clients=[0], delta=1e-5, confidence=0.95, defenses=[{"name": "clip", "params": {}}])
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(RuntimeError, match="FEDPROBE_CLIENT_SECRET"):
        a.included(0)
    with pytest.raises(ValueError, match="integer >= 2"):
        GradientCanaries(canaries=1)


# -- canary clients in central DP -------------------------------------------------------------------------------
def _canary_clients(m=100, z=1.0, clip=1.0, n=10):
    from defenses.canaries import CanaryClients

    a = CanaryClients(canaries=m)
    a.bind(seed=0, clients=[0], delta=1e-5, confidence=0.95,
           defenses=[{"name": "central_dp", "params": {"noise_multiplier": z, "clipping_norm": clip}}],
           federation={"num_clients": n, "clients_per_round": n})
    return a


def test_canary_clients_join_the_central_dp_sum_before_the_noise(monkeypatch):
    """Flower's wrapper with noise 0: the aggregate moves by exactly (sum of sampled canary updates) / m."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from defenses.central_dp import CentralDP
    from fl.config import Config

    for attr in ("_run_id", "_node_id", "_task_id"):
        if hasattr(TaskIdentity, attr):
            monkeypatch.setattr(TaskIdentity, attr, 1)
    monkeypatch.setenv(SECRET_ENV, "audit test")
    d = CentralDP(noise_multiplier=0.0, clipping_norm=1.0)
    wrapped = d.wrap_strategy(FedAvg(), Config.model_validate({"federation": {"num_clients": 2, "clients_per_round": 2}}))
    audit = _canary_clients(m=50, n=2)
    d.attach_canaries(audit)
    zero = {"w": torch.zeros(300)}
    wrapped.current_arrays = ArrayRecord(zero)
    instr = [Message(RecordDict({"arrays": ArrayRecord(zero)}), message_type=MessageType.TRAIN, dst_node_id=i + 1)
             for i in range(2)]
    small = {"w": torch.full((300,), 0.01)}  # (an all-zero update divides by 0 in Flower 1.42)
    replies = [Message(RecordDict({"arrays": ArrayRecord(small), "metrics": MetricRecord({"num-examples": 1.0,
                                                                                         "uniform-weight": 1.0})}),
                       reply_to=instr[i]) for i in range(2)]
    arrays, _ = wrapped.aggregate_train(1, replies)
    got = torch.from_numpy(arrays.to_numpy_ndarrays()[0]) - 0.01
    expected = audit.server_canaries(1, zero)[0]["w"] / 2
    assert torch.allclose(got, expected, atol=1e-6) and expected.norm() > 0
    audit.observe_global(1, zero, {"w": got})
    s, b = audit.scores()[-1], audit.included()
    # no noise: an included canary scores about 1 (its own contribution), an absent one about 0
    assert s[b].mean() == pytest.approx(1.0, abs=0.2) and abs(s[~b].mean()) < 0.2
    assert audit.result()["epsilon_lower"] > 1


def test_canary_client_bound_tracks_the_noise(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "audit test")
    bounds = {}
    for z in (0.5, 5.0):
        a = _canary_clients(m=400, z=z)
        before = {"w": torch.zeros(5000)}
        for rnd in range(1, 4):
            g = torch.Generator().manual_seed(rnd)
            after = {"w": before["w"] + a.server_canaries(rnd, before)[0]["w"] / 10 + torch.randn(5000, generator=g) * z / 10}
            a.observe_global(rnd, before, after)
            before = after
        bounds[z] = a.result()["epsilon_lower"]
    assert bounds[0.5] > 1.5 and bounds[5.0] < 0.5
    assert bounds[0.5] <= epsilon(0.5, 1.0, 3, 1e-5)


# -- canary clients through update noise --------------------------------------------------------------------------
def _update_canaries(m=400, sigma=1.0, rounds=3, adjacency="replace", accountant="pld"):
    from defenses.canaries import UpdateCanaries

    a = UpdateCanaries(canaries=m)
    params = {"noise_multiplier": sigma, "clip_norm": 1.0, "adjacency": adjacency, "accountant": accountant}
    a.bind(seed=0, clients=[0], delta=1e-5, confidence=0.95, defenses=[{"name": "update_noise", "params": params}])
    model = {"w": torch.zeros(50, 4), "b": torch.zeros(7)}
    for rnd in range(1, rounds + 1):
        a.observe_global(rnd, model, model)  # the canary clients' releases are all it scores
    accounted = sigma / (2.0 if adjacency == "replace" else 1.0)
    return a, (epsilon(accounted, 1.0, rounds, 1e-5, "pld") if sigma > 0 else math.inf)


def test_update_canaries_release_through_update_noise(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "audit test")
    clean, _ = _update_canaries(sigma=0.0)  # clipping alone: the releases are exactly +-C every round
    s, b = clean.scores()[-1], clean.included()
    assert 0.3 < b.mean() < 0.7
    assert np.allclose(s[b], 3.0) and np.allclose(s[~b], -3.0)
    add_remove, _ = _update_canaries(sigma=0.0, adjacency="add_remove")  # the neighbour sends nothing
    assert np.allclose(add_remove.scores()[-1][~b], 0.0)
    noisy, _ = _update_canaries(sigma=2.0)
    gap = noisy.scores()[-1][b].mean() - noisy.scores()[-1][~b].mean()
    assert gap == pytest.approx(6.0, abs=1.0)  # the signal survives on average ...
    assert noisy.scores()[-1][b].std() == pytest.approx(2.0 * math.sqrt(3), rel=0.2)  # ... under the defense's noise


def test_update_canaries_bounds_are_sound_and_track_the_noise(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "audit test")
    clean, eps_clean = _update_canaries(sigma=0.0)
    assert math.isinf(eps_clean) and clean.result()["epsilon_lower"] > 3
    bounds = []
    for secret in ("u1", "u1", "u2"):
        monkeypatch.setenv(SECRET_ENV, secret)
        a, eps = _update_canaries(sigma=3.0)
        r = a.result()
        assert 0 < r["epsilon_lower"] <= eps and r["epsilon_lower_gdp"] <= eps
        bounds.append(r)
    assert bounds[0] == bounds[1] and bounds[0] != bounds[2]
    weak, eps_weak = _update_canaries(sigma=60.0)
    assert weak.result()["epsilon_lower"] < 0.5 and weak.result()["epsilon_lower"] <= eps_weak


def test_update_canaries_need_update_noise_with_clipping():
    from defenses.canaries import UpdateCanaries

    with pytest.raises(ValueError, match="name = \"update_noise\""):
        UpdateCanaries(canaries=10).bind(seed=0, clients=[0], delta=1e-5, confidence=0.95, defenses=[])
    with pytest.raises(ValueError, match="clip_norm > 0"):
        UpdateCanaries(canaries=10).bind(seed=0, clients=[0], delta=1e-5, confidence=0.95, defenses=[
            {"name": "update_noise", "params": {"clip_norm": 0.0, "noise_std": 1.0}}])
