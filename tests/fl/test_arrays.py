import pytest
import torch

from fl.arrays import InvalidUpdate, check_update, from_record, load_trainable, to_record, trainable_state


def test_record_round_trip_keeps_values_and_dtypes():
    state = {"w": torch.randn(3, 4), "ids": torch.tensor([1, 2, 3])}
    back = from_record(to_record(state))
    assert torch.equal(back["w"], state["w"]) and back["ids"].dtype == torch.int64


def test_trainable_state_skips_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    names = set(trainable_state(model))
    assert "0.weight" not in names and {"0.bias", "1.weight", "1.bias"} <= names
    new = {k: torch.zeros_like(v) for k, v in trainable_state(model).items()}
    load_trainable(model, new)
    assert float(model[1].weight.abs().sum()) == 0.0


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"w": torch.full((2, 2), float("nan"))}, "NaN or Inf"),
        ({"w": torch.full((2, 2), float("inf"))}, "NaN or Inf"),
        ({"w": torch.zeros(3, 2)}, "shape"),
        ({"w": torch.zeros(2, 2, dtype=torch.float64)}, "dtype"),
        ({"v": torch.zeros(2, 2)}, "names differ"),
    ],
)
def test_invalid_updates_are_rejected(bad, reason):
    with pytest.raises(InvalidUpdate, match=reason):
        check_update(bad, {"w": torch.zeros(2, 2)})
    check_update({"w": torch.ones(2, 2)}, {"w": torch.zeros(2, 2)})


def test_flat_record_round_trip_is_one_array_per_dtype():
    from fl.arrays import is_flat, like, to_flat_record

    state = {"w": torch.randn(3, 4), "scalar": torch.tensor(2.5), "ids": torch.tensor([1, 2, 3]),
             "b": torch.randn(5)}
    record = to_flat_record(state)
    assert len(record) == 2 and is_flat(record) and not is_flat(to_record(state))  # float32 and int64
    back = from_record(record)
    assert list(back) == ["w", "scalar", "b", "ids"]  # grouped by dtype, in order within a group
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    assert is_flat(like(record, state)) and not is_flat(like(to_record(state), state))


def test_a_flat_record_that_does_not_match_its_layout_is_refused():
    from flwr.app import Array, ArrayRecord

    from fl.arrays import FLAT_PREFIX

    short = ArrayRecord({f'{FLAT_PREFIX}float32|[["w",[2,2]]]': Array(torch.zeros(3).numpy())})
    with pytest.raises(ValueError, match="does not match its layout"):
        from_record(short)
    with pytest.raises(ValueError, match="malformed flat-array key"):
        from_record(ArrayRecord({f"{FLAT_PREFIX}float32|not json": Array(torch.zeros(3).numpy())}))


def test_torch_mean_of_flat_replies_equals_flowers_fedavg_on_per_tensor_replies():
    """PartitionSampledFedAvg's in-place torch mean (on the hook's decoded tensors) = Flower's numpy FedAvg."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fl.arrays import to_flat_record
    from fl.strategy import PartitionSampledFedAvg

    gen = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(4, 3, generator=gen), "b": torch.randn(7, generator=gen)} for _ in range(3)]
    weights = [13.0, 7.0, 90.0]
    per_tensor = [RecordDict({"arrays": to_record(s), "metrics": MetricRecord({"num-examples": w})})
                  for s, w in zip(states, weights)]
    want = from_record(aggregate_arrayrecords(per_tensor, "num-examples"))
    strategy = PartitionSampledFedAvg({}, 3, 0)
    flat = [RecordDict({"arrays": to_flat_record(s), "metrics": MetricRecord({"num-examples": w})})
            for s, w in zip(states, weights)]
    strategy.decoded = {id(c["arrays"]): (c["arrays"], from_record(c["arrays"])) for c in flat[:2]}  # 3rd: decoded
    got = strategy._weighted_mean(flat)
    assert got is not None and len(got) == 1
    got_state = from_record(got)
    for k in want:
        assert torch.equal(got_state[k], want[k]), k
    assert len(from_record(strategy._weighted_mean(per_tensor))) == 2  # per-tensor in, per-tensor out
