import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from defenses.accounting import PrivacyLedger, epsilon, epsilon_of_history, noise_multiplier_for


@pytest.mark.parametrize("z,q,steps", [(1.1, 0.01, 200), (0.8, 0.25, 12), (2.0, 1.0, 3)])
def test_epsilon_matches_opacus_rdp_accountant_stepped(z, q, steps):
    """Spec 5(d)3: same (sigma, q, T) -> same epsilon as Opacus's RDP accountant, stepped one step at a time."""
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    assert epsilon(z, q, steps, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


def test_epsilon_matches_rdp_analysis_directly():
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=0.02, noise_multiplier=1.3, steps=500, orders=orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-6)
    assert epsilon(1.3, 0.02, 500, 1e-6) == pytest.approx(float(eps), rel=1e-12)
    # Gaussian mechanism at q = 1, one step: RDP eps(alpha) = alpha / (2 z^2); check the closed form
    assert float(rdp_analysis.compute_rdp(q=1.0, noise_multiplier=2.0, steps=1, orders=[4.0])[0]) == pytest.approx(4 / 8)


def test_epsilon_matches_opacus_prv_accountant():
    acc = PRVAccountant()
    for _ in range(50):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
    assert epsilon(1.0, 0.05, 50, 1e-5, "prv") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # PRV is tighter than RDP for the same mechanism
    assert epsilon(1.0, 0.05, 50, 1e-5, "prv") < epsilon(1.0, 0.05, 50, 1e-5, "rdp")


def test_epsilon_monotone_and_edge_cases():
    e = [epsilon(1.0, 0.1, t, 1e-5) for t in (1, 10, 100)]
    assert 0 < e[0] < e[1] < e[2]
    assert epsilon(1.0, 0.1, 10, 1e-5) > epsilon(2.0, 0.1, 10, 1e-5)  # more noise, less epsilon
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert math.isinf(epsilon(0.0, 0.1, 5, 1e-5))  # no noise, no guarantee


def test_ledger_composes_rounds_and_roundtrips_json():
    ledger = PrivacyLedger("rdp")
    eps = []
    for _ in range(3):
        restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())), "rdp")
        restored.record(1.0, 0.1, 10)
        ledger = restored
        eps.append(ledger.epsilon(1e-5))
    assert ledger.history == [(1.0, 0.1, 30)]  # equal entries merge, like Opacus
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(epsilon(1.0, 0.1, 30, 1e-5), rel=1e-12)
    # heterogeneous history equals Opacus's heterogeneous composition
    ledger.record(2.0, 0.2, 5)
    acc = RDPAccountant()
    acc.history = [(1.0, 0.1, 30), (2.0, 0.2, 5)]
    assert ledger.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger.from_dict(ledger.to_dict(), "prv")


def test_noise_multiplier_for_reaches_target():
    z = noise_multiplier_for(3.0, 1e-5, 0.05, 100)
    assert epsilon(z, 0.05, 100, 1e-5) <= 3.0
    assert epsilon(z * 0.95, 0.05, 100, 1e-5) > 2.9


@pytest.mark.parametrize("call,match", [
    (lambda: epsilon(1.0, 0.1, 10, 0.0), "delta"),
    (lambda: epsilon(1.0, 0.1, 10, 1.0), "delta"),
    (lambda: epsilon(1.0, 0.1, 10, -1e-5), "delta"),
    (lambda: epsilon(-0.5, 0.1, 10, 1e-5), "noise_multiplier"),
    (lambda: epsilon(1.0, 0.0, 10, 1e-5), "sample_rate"),
    (lambda: epsilon(1.0, 1.5, 10, 1e-5), "sample_rate"),
    (lambda: epsilon(1.0, 0.1, -1, 1e-5), "steps"),
    (lambda: epsilon(1.0, 0.1, 10, 1e-5, "gdp2"), "accountant"),
    (lambda: noise_multiplier_for(0.0, 1e-5, 0.1, 10), "target_epsilon"),
    (lambda: noise_multiplier_for(-1.0, 1e-5, 0.1, 10), "target_epsilon"),
    (lambda: epsilon_of_history([(1.0, 0.1, 5)], 2.0), "delta"),
])
def test_bad_values_give_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- the second accountant family: Google's dp-accounting (PLD) ---------------------------------------------
@pytest.mark.parametrize("history", [
    [(1.0, 1 / 130, 390)],                     # the flagship's Poisson DP-SGD, 3 epochs
    [(0.5, 1.0, 1)],                           # one pass of fixed-size batches (no amplification)
    [(1.2, 0.25, 12), (0.8, 0.25, 4)],         # a ledger whose noise changed between rounds
    [(2.0, 1.0, 3), (1.1, 0.01, 200)],         # update noise then DP-SGD
])
def test_pld_agrees_with_opacus_prv_and_is_below_rdp(history):
    """Same histories, two libraries: PLD and PRV are both numerically tight, RDP is an upper bound above them."""
    pld = epsilon_of_history(history, 1e-5, "pld")
    prv = epsilon_of_history(history, 1e-5, "prv")
    rdp = epsilon_of_history(history, 1e-5, "rdp")
    assert pld == pytest.approx(prv, rel=0.03)
    assert pld <= rdp * 1.001


def test_pld_gaussian_matches_the_closed_form():
    """One Gaussian release (q = 1): delta(eps) = Phi(-eps z + 1/(2z)) - e^eps Phi(-eps z - 1/(2z)) (Balle & Wang 2018)."""
    from scipy.stats import norm

    z = 1.5
    eps = epsilon_of_history([(z, 1.0, 1)], 1e-5, "pld")
    delta = norm.cdf(-eps * z + 1 / (2 * z)) - math.exp(eps) * norm.cdf(-eps * z - 1 / (2 * z))
    assert delta == pytest.approx(1e-5, rel=0.02)


def test_pld_ledger_and_calibration():
    ledger = PrivacyLedger(accountant="pld")
    ledger.record(1.0, 0.1, 20)
    assert PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())), "pld").epsilon(1e-5) == ledger.epsilon(1e-5)
    z = noise_multiplier_for(3.0, 1e-5, 0.1, 20, "pld")
    assert epsilon(z, 0.1, 20, 1e-5, "pld") <= 3.0 < epsilon(z - 0.02, 0.1, 20, 1e-5, "pld")


@pytest.mark.parametrize("history", [
    [(0.5, 1 / 9, 9)],
    [(0.5, 1 / 9, 9), (0.5, 1 / 8, 18), (1.2, 0.05, 100)],
    [(0.01, 1.0, 30)],
    [(2.0, 0.004, 10_000), (0.8, 0.25, 3)],
])
def test_cached_rdp_epsilon_equals_opacus_bit_for_bit(history):
    from opacus.accountants import RDPAccountant

    from defenses.accounting import epsilon_of_history

    acc = RDPAccountant()
    acc.history = list(history)
    expected = float(acc.get_epsilon(delta=1e-5))
    assert epsilon_of_history(history, 1e-5, "rdp") == expected
    assert epsilon_of_history(history, 1e-5, "rdp") == expected  # the cached curve gives the same again
