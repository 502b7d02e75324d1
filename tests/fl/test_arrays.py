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
