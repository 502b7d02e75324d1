"""Threat-model-aware attacks (issue 12): scale invariance, defense-aware simulation, APRIL,
best_of, deterministic budgets and the safety cap."""

import math

import pytest
import torch
from tests.attacks.test_gradient_inversion import IMG, client_round, digits, vit

from attacks.base import ATTACKS, Attack, Observation, Reconstruction
from attacks.gradients import attack_model, gradient_distance, noise_weights, simulate
from attacks.harness import attack_and_score, score_best
from attacks.threat import public_defenses
from models.tasks import per_example_loss


def _rand_grads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(5, 3, generator=g, dtype=torch.float64), "b": torch.randn(7, generator=g, dtype=torch.float64)}


def test_cosine_objective_is_scale_invariant_and_l2_is_not():
    sim, tgt = _rand_grads(0), _rand_grads(1)
    for c in (1e-3, 0.5, 7.0):
        scaled = {k: c * v for k, v in tgt.items()}
        assert float(gradient_distance(sim, scaled, "cosine")) == pytest.approx(float(gradient_distance(sim, tgt, "cosine")))
    assert float(gradient_distance(sim, {k: 0.01 * v for k, v in tgt.items()}, "l2")) != pytest.approx(
        float(gradient_distance(sim, tgt, "l2")))
    assert float(gradient_distance(tgt, {k: 3 * v for k, v in tgt.items()}, "cosine")) == pytest.approx(0.0, abs=1e-12)


def test_weights_skip_masked_entries():
    sim, tgt = _rand_grads(0), _rand_grads(1)
    w = {"a": 1.0, "b": 0.0}
    assert float(gradient_distance(sim, tgt, "l2", weight=w)) == pytest.approx(float(((sim["a"] - tgt["a"]) ** 2).sum()))
    # noise weights: a tensor at the noise level gets weight 0, a strong one about 1
    nw = noise_weights({"noise": 0.01 * torch.randn(10000), "signal": torch.ones(10)}, noise_std=0.01)
    assert nw["noise"] < 0.1 and nw["signal"] > 0.99


def test_public_defense_facts():
    f = public_defenses([{"name": "dp_sgd", "params": {"noise_multiplier": 0.5, "max_grad_norm": 2.0}},
                         {"name": "prune", "params": {}}, {"name": "my_pkg:Secret", "params": {}}])
    assert (f.example_clip, f.noise_multiplier, f.pruned) == (2.0, 0.5, True)
    assert f.modelled == ("dp_sgd", "prune") and f.unmodelled == ("my_pkg:Secret",)
    assert public_defenses([{"name": "clip", "params": {"max_norm": 0.3}}]).update_clip == 0.3


def _opacus_style_clipped_gradient(batch, C):
    """What a DP-SGD client without noise computes: mean of per-example gradients clipped to C."""
    m = vit()
    params = dict(m.named_parameters())
    total = None
    for i in range(len(batch["labels"])):
        m.zero_grad()
        loss = per_example_loss(m(pixel_values=batch["pixel_values"][i : i + 1]).logits, batch["labels"][i : i + 1], IMG).mean()
        loss.backward()
        g = {k: p.grad.detach().clone() for k, p in params.items()}
        norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
        f = min(1.0, C / (norm + 1e-6))
        total = {k: f * v for k, v in g.items()} if total is None else {k: total[k] + f * v for k, v in g.items()}
    return {k: v / len(batch["labels"]) for k, v in total.items()}, {k: p.detach().clone() for k, p in params.items()}


def test_defense_aware_simulation_reproduces_per_example_clipping():
    batch = digits(3, start=10)
    C = 0.05  # far below the gradient norms: every example is clipped
    target, g0 = _opacus_style_clipped_gradient(batch, C)
    model = attack_model(vit, torch.float64)
    params = {k: v.double().requires_grad_(True) for k, v in g0.items()}
    x = batch["pixel_values"].double()
    sim = simulate(model, params, list(params), {"pixel_values": x}, batch["labels"], IMG, 1, 0.1, 3, example_clip=C)
    err = max(float((sim[k].detach() - target[k].double()).abs().max()) for k in target)
    plain = simulate(model, params, list(params), {"pixel_values": x}, batch["labels"], IMG, 1, 0.1, 3)
    gap = max(float((plain[k].detach() - target[k].double()).abs().max()) for k in target)
    assert err < 1e-6 < gap


def test_update_clip_simulation_matches_a_clipped_update():
    batch = digits(1, start=3)
    obs = client_round(vit, batch, IMG, lr=0.1)
    upd = obs.update()
    norm = math.sqrt(sum(float((v**2).sum()) for v in upd.values()))
    model = attack_model(vit, torch.float64)
    params = {k: v.double().requires_grad_(True) for k, v in obs.global_params.items()}
    sim = simulate(model, params, list(params), {"pixel_values": batch["pixel_values"].double()}, batch["labels"], IMG,
                   1, 0.1, 1, update_clip=0.1 * norm)  # the released update would be scaled by 0.1
    sim_norm = math.sqrt(sum(float((sim[k].detach() ** 2).sum()) for k in upd))
    assert 0.1 * sim_norm == pytest.approx(0.1 * norm, rel=1e-4)  # released norm: 10 % of the unclipped one
    assert float(gradient_distance({k: v.detach() for k, v in sim.items()}, {k: -v.double() for k, v in upd.items()},
                                   "cosine")) < 1e-8  # same direction


def _clipped_observation(batch, C=1.0, lr=0.1, steps=1):
    """A client that sends -lr * sum of clipped gradients (DP-SGD without noise) of one example, ``steps`` times."""
    obs = client_round(vit, batch, IMG, lr=lr, steps=steps)
    upd = obs.update()
    norm = math.sqrt(sum(float((v**2).sum()) for v in upd.values()))
    scale = min(1.0, C * lr / norm)
    obs.client_params = {k: obs.global_params[k] + scale * upd[k] for k in upd}
    obs.defenses = ({"name": "clip", "params": {"max_norm": C * lr}},)
    return obs


def test_april_is_exact_at_b1_fedsgd_fedavg_and_under_clipping():
    batch = digits(1, start=7)
    for obs in (client_round(vit, batch, IMG), client_round(vit, batch, IMG, steps=3, bs=1),
                _clipped_observation(batch, C=0.01)):
        _, s = attack_and_score(ATTACKS.create("april"), obs, batch)
        # float32 client weights limit a tiny clipped update's precision: > 45 dB, not always the 80 dB cap
        assert s["recovered_fraction"] == 1.0 and s["psnr"] > 45 and s["label_accuracy"] == 1.0


def test_l2_fails_on_a_clipped_update_where_cosine_and_defense_aware_do_not():
    batch = digits(1, start=0)
    obs = _clipped_observation(batch, C=0.01)
    l2 = attack_and_score(ATTACKS.create("idlg", iterations=100), obs, batch)[1]["psnr"]
    cos = attack_and_score(ATTACKS.create("idlg", iterations=100, objective="cosine", init="april"), obs, batch)[1]["psnr"]
    aware = attack_and_score(ATTACKS.create("idlg", iterations=100, defense_aware=True, init="april"), obs, batch)[1]["psnr"]
    assert l2 < 20 and cos > 40 and aware > 40


class _Fixed(Attack):
    """A stand-in member that returns a given reconstruction."""

    def __init__(self, inputs=None) -> None:
        super().__init__()
        self.inputs = inputs

    def attack(self, obs: Observation) -> Reconstruction:
        return Reconstruction(inputs=self.inputs, labels=torch.tensor([0, 1]), metrics={"own": 1.0})


def test_best_of_reports_the_strongest_member_per_victim(monkeypatch):
    orig = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # normalised space
    good = orig[[1, 0]].clone()  # exact, permuted
    bad = torch.zeros_like(orig)
    half = torch.stack([orig[0], torch.zeros_like(orig[1])])  # one of two exact
    for name, x in (("t_bad", bad), ("t_good", good), ("t_half", half)):
        monkeypatch.setitem(ATTACKS._entries, name, type(name, (_Fixed,), {"__init__": lambda self, x=x: _Fixed.__init__(self, x)}))
    att = ATTACKS.create("best_of", members=["t_bad", {"name": "t_half"}, {"name": "t_good", "label": "winner"}])
    obs = client_round(vit, digits(1), IMG)
    rec = att.attack(obs)
    shown, s = score_best(rec, {"pixel_values": orig, "labels": torch.tensor([1, 1])}, IMG)
    assert s["best_member"] == 2 and s["recovered_fraction"] == 1.0 and shown.inputs is good
    assert s["t_half/recovered_fraction"] == 0.5 and s["t_bad/recovered_fraction"] == 0.0
    assert rec.metrics["winner/own"] == 1.0
    with pytest.raises(ValueError, match="distinct"):
        ATTACKS.create("best_of", members=["idlg", "idlg"])
    with pytest.raises(Exception, match="unexpected parameters"):
        ATTACKS.create("best_of", members=[{"name": "idlg", "params": {"iterationz": 3}}])
    with pytest.raises(ValueError, match="honest"):
        ATTACKS.create("best_of", members=["imprint"])


class _Refuses(Attack):
    def attack(self, obs: Observation) -> Reconstruction:
        raise ValueError("this threat model does not fit")


def test_best_of_skips_a_member_that_cannot_attack_and_names_the_winner_in_the_member_list(monkeypatch):
    """A member that raises ValueError is skipped (``<label>/skipped``); ``best_member`` still indexes the member list
    as given, not the members that ran."""
    orig = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setitem(ATTACKS._entries, "t_refuses", _Refuses)
    monkeypatch.setitem(ATTACKS._entries, "t_good", type("t_good", (_Fixed,), {"__init__": lambda self: _Fixed.__init__(
        self, orig.clone())}))
    monkeypatch.setitem(ATTACKS._entries, "t_bad", type("t_bad", (_Fixed,), {"__init__": lambda self: _Fixed.__init__(
        self, torch.zeros_like(orig))}))
    rec = ATTACKS.create("best_of", members=["t_bad", "t_refuses", "t_good"]).attack(client_round(vit, digits(1), IMG))
    _, s = score_best(rec, {"pixel_values": orig, "labels": torch.tensor([1, 1])}, IMG)
    assert s["best_member"] == 2 and rec.metrics["t_refuses/skipped"] == 1.0
    assert "does not fit" in rec.artifacts["member_errors"][0]


def test_a_short_attack_is_deterministic():
    batch = digits(1, start=40)
    obs = client_round(vit, batch, IMG)
    runs = [attack_and_score(ATTACKS.create("idlg", iterations=40, objective="cosine"), obs, batch) for _ in range(2)]
    assert torch.equal(runs[0][0].inputs, runs[1][0].inputs)
    keys = ("psnr", "ssim", "grad_distance", "iterations")
    assert [runs[0][1][k] for k in keys] == [runs[1][1][k] for k in keys]
    assert runs[0][1]["iterations"] == 40 and runs[0][1]["budget_limited"] == 0


def test_safety_cap_fires_inside_lbfgs_and_marks_the_score():
    batch = digits(2, start=40)
    obs = client_round(vit, batch, IMG)
    rec = ATTACKS.create("idlg", iterations=100000, max_seconds=0.5).attack(obs)
    assert rec.metrics["budget_limited"] == 1.0 and rec.metrics["attack_seconds"] < 30
    assert torch.isfinite(rec.inputs).all()
    with pytest.raises(ValueError, match="max_seconds"):
        ATTACKS.create("idlg", max_seconds=float("inf"))


def test_psnr_baseline_scores_the_prior_image_not_the_attack():
    from attacks.harness import score
    from attacks.metrics import per_example_psnr
    from attacks.harness import to_unit_range

    g = torch.Generator().manual_seed(4)
    orig = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1  # normalised space (mean 0.5, std 0.5)
    prior = orig.mean(0)
    s = score(Reconstruction(inputs=orig.clone()), {"pixel_values": orig}, IMG, image_prior=prior)
    expected = per_example_psnr(to_unit_range(prior[None].expand_as(orig), IMG), to_unit_range(orig, IMG)).median()
    assert s["psnr"] == 80.0 and s["psnr_baseline"] == pytest.approx(float(expected)) and s["psnr_baseline"] < 30
    one = orig[1:2]  # a prior equal to the (only) original is an exact guess
    assert score(Reconstruction(inputs=one), {"pixel_values": one}, IMG, image_prior=one[0])["psnr_baseline"] == 80.0


def test_recovered_baseline_is_the_share_the_prior_image_already_recovers():
    from attacks.harness import score

    g = torch.Generator().manual_seed(5)
    orig = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    prior = orig[2]  # equal to one original of four: that one is "recovered" by the data-free guess
    s = score(Reconstruction(inputs=orig.clone()), {"pixel_values": orig}, IMG, image_prior=prior)
    assert s["recovered_fraction"] == 1.0 and s["recovered_baseline"] == 0.25
    far = score(Reconstruction(inputs=orig.clone()), {"pixel_values": orig}, IMG, image_prior=orig.mean(0))
    assert far["recovered_baseline"] == 0.0


@pytest.mark.parametrize("steps, clip", [(1, 0.0), (1, 0.05), (3, 0.05)])
def test_a_scored_only_simulation_keeps_no_graph_and_the_same_values(steps, clip):
    batch = digits(3, start=20)
    model = attack_model(vit, torch.float64)
    params = {k: v.detach().double().requires_grad_(True) for k, v in vit().named_parameters()}
    x = {"pixel_values": batch["pixel_values"].double()}
    graph = simulate(model, params, list(params), x, batch["labels"], IMG, steps, 0.1, 1, example_clip=clip)
    flat = simulate(model, params, list(params), x, batch["labels"], IMG, steps, 0.1, 1, example_clip=clip,
                    create_graph=False)
    assert all(v.grad_fn is not None for v in graph.values())
    assert all(v.grad_fn is None or steps > 1 for v in flat.values())
    for k in graph:
        assert torch.allclose(graph[k].detach(), flat[k].detach(), rtol=0, atol=1e-12), k
    if steps == 1:  # nothing to differentiate: a search needs create_graph=True
        with pytest.raises(RuntimeError):
            torch.autograd.grad(sum((v**2).sum() for v in flat.values()), [params[next(iter(params))]])
