import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from defenses.accounting import epsilon
from defenses.central_dp import CentralDP
from fl.config import Config


def _cfg(n=10, m=4):
    return Config.model_validate({"federation": {"num_clients": n, "clients_per_round": m}})


def _reply(instruction: Message, arrays: dict, num_examples: float, weight: float = 1.0) -> Message:
    content = RecordDict({"arrays": ArrayRecord(arrays),
                          "metrics": MetricRecord({"num-examples": num_examples, "uniform-weight": weight})})
    return Message(content, reply_to=instruction)


def test_wraps_flower_fixed_clipping_and_accounts_under_client_sampling():
    d = CentralDP(noise_multiplier=1.5, clipping_norm=0.5, delta=1e-5)
    wrapped = d.wrap_strategy(FedAvg(), _cfg(10, 4))
    assert isinstance(wrapped, DifferentialPrivacyServerSideFixedClipping)
    assert (wrapped.noise_multiplier, wrapped.clipping_norm, wrapped.num_sampled_clients) == (1.5, 0.5, 4)
    m1, m3 = d.server_metrics(1), d.server_metrics(3)
    assert m3["central_epsilon"] == pytest.approx(epsilon(1.5, 0.4, 3, 1e-5), rel=1e-12)
    assert m1["central_epsilon"] < m3["central_epsilon"]
    assert m3["central_noise_std"] == pytest.approx(1.5 * 0.5 / 4)
    no_amp = CentralDP(noise_multiplier=1.5, clipping_norm=0.5, amplification=False)
    no_amp.wrap_strategy(FedAvg(), _cfg(10, 4))
    assert no_amp.server_metrics(3)["central_epsilon"] > m3["central_epsilon"]  # sampling amplifies


def test_aggregate_clips_and_adds_noise_of_the_stated_scale(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # a Message needs a run identity outside a Flower run
        if hasattr(TaskIdentity, attr):
            monkeypatch.setattr(TaskIdentity, attr, 1)
    """Two clients with huge updates: aggregate - global is the mean of clipped updates plus N(0, (zC/m)^2)."""
    z, C, m, dim = 2.0, 1.0, 2, 20000
    d = CentralDP(noise_multiplier=z, clipping_norm=C)
    wrapped = d.wrap_strategy(FedAvg(), _cfg(m, m))
    zero = {"w": torch.zeros(dim)}
    instr = [Message(RecordDict({"arrays": ArrayRecord(zero)}), message_type=MessageType.TRAIN, dst_node_id=i + 1)
             for i in range(m)]
    wrapped.current_arrays = ArrayRecord(zero)
    replies = [_reply(instr[i], {"w": torch.full((dim,), 100.0)}, 5.0) for i in range(m)]
    arrays, _ = wrapped.aggregate_train(1, replies)
    out = arrays.to_numpy_ndarrays()[0]
    clipped_mean = C / np.sqrt(dim)  # each update clipped to norm C, all entries equal
    assert abs(out.mean() - clipped_mean) < 4 * z * C / m / np.sqrt(dim)
    assert out.std() == pytest.approx(z * C / m, rel=0.03)
    assert d.server_metrics(1)["central_dp_uniform_weights"] == 1.0
    # unequal client sizes (num-examples, FedAvg's own key, no fedprobe key): the wrapper aggregates uniformly,
    # so the C/m sensitivity holds; the metric says the clients' weights differed (an all-zero update divides
    # by 0 in Flower 1.42)
    d0 = CentralDP(noise_multiplier=0.0, clipping_norm=C)
    plain = d0.wrap_strategy(FedAvg(), _cfg(m, m))
    plain.current_arrays = ArrayRecord(zero)
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((dim,), 0.001 * (i + 1))}),
                                   "metrics": MetricRecord({"num-examples": 5.0 + 10 * i})}), reply_to=instr[i])
               for i in range(m)]
    arrays, _ = plain.aggregate_train(2, replies)
    assert arrays.to_numpy_ndarrays()[0].mean() == pytest.approx(0.0015, rel=1e-5)  # the unweighted mean
    assert d0.server_metrics(2)["central_dp_uniform_weights"] == 0.0
    assert plain.defense is d0


@pytest.mark.parametrize("params,match", [
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"clipping_norm": 0.0}, "clipping_norm"),
    ({"delta": 0.0}, "delta"),
    ({"accountant": "x"}, "accountant"),
])
def test_bad_values(params, match):
    with pytest.raises(ValueError, match=match):
        CentralDP(**params)
