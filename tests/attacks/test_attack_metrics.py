"""Known values of the reconstruction scores."""

import math

import pytest
import torch

from attacks.metrics import image_scores, label_accuracy, psnr, rouge_l, rouge_n, ssim, text_scores


def test_psnr_known_value():
    x = torch.zeros(1, 1, 8, 8)
    assert psnr(x, x + 0.1) == pytest.approx(20.0)  # MSE 0.01 -> 20 dB
    assert psnr(x, x + 0.01) == pytest.approx(40.0)
    assert math.isinf(psnr(x, x))


def test_ssim_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 16, 16, generator=g)
    assert ssim(x, x) == pytest.approx(1.0)
    # constant images a, b: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    assert ssim(torch.full((1, 1, 8, 8), a), torch.full((1, 1, 8, 8), b)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    assert ssim(x, 1 - x) < 0  # anti-correlated structure
    noisy = [ssim(x, x + s * torch.randn(x.shape, generator=g)) for s in (0.01, 0.1, 0.3)]
    assert noisy[0] > noisy[1] > noisy[2]


def test_image_scores_undo_batch_permutation():
    g = torch.Generator().manual_seed(1)
    orig = torch.rand(4, 1, 8, 8, generator=g)
    rec = orig[[2, 0, 3, 1]] + 0.01
    s = image_scores(rec, orig)
    assert s["psnr"] == pytest.approx(40.0, abs=1e-3) and s["ssim"] > 0.99
    assert image_scores(orig[[1, 0, 3, 2]].flip(-1), orig)["psnr"] < 30


def test_rouge_known_values():
    ref, rec = "the cat sat on the mat".split(), "the cat ate on the mat".split()
    assert rouge_n(rec, ref, 1) == pytest.approx(5 / 6)
    assert rouge_n(rec, ref, 2) == pytest.approx(3 / 5)  # the-cat, on-the, the-mat of 5 bigrams
    assert rouge_l(rec, ref) == pytest.approx(5 / 6)
    assert rouge_l("a b c d".split(), "d c b a".split()) == pytest.approx(1 / 4)
    assert rouge_n("a a a".split(), "a b c".split(), 1) == pytest.approx(1 / 3)  # clipped counts


def test_text_scores_mask_and_order():
    orig = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rec = torch.tensor([[4, 5, 9, 7], [1, 2, 3, 9]])  # swapped sentences, padding wrong (ignored)
    s = text_scores(rec, orig, mask)
    assert s["token_accuracy"] == pytest.approx(6 / 7)
    assert s["rouge1"] == pytest.approx((1 + 0.75) / 2)


def test_label_accuracy_is_order_free():
    assert label_accuracy(torch.tensor([3, 1, 1]), torch.tensor([1, 3, 2])) == pytest.approx(2 / 3)


def test_recovered_fraction_and_exact_cap():
    from attacks.metrics import EXACT_PSNR, format_psnr

    g = torch.Generator().manual_seed(2)
    orig = torch.rand(4, 1, 8, 8, generator=g)
    rec = orig.clone()
    rec[1] = (orig[1] + 0.1).clamp(0, 1)  # ~20 dB
    rec[2] = orig[2] + 0.01  # 40 dB
    rec[3] = 1 - orig[3]  # far off
    s = image_scores(rec[[3, 0, 2, 1]], orig)
    assert s["recovered_fraction"] == 0.5 and s["exact_fraction"] == 0.25
    assert s["psnr_max"] == EXACT_PSNR  # the exact one is capped, not inf
    assert image_scores(rec, orig, recovered_psnr=15)["recovered_fraction"] == 0.75
    assert format_psnr(134.2) == ">= 80 dB (exact)" and format_psnr(23.46) == "23.5 dB"


def test_ssim_is_torchmetrics_standard_definition():
    from torchmetrics.functional.image import structural_similarity_index_measure

    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 8, 8, generator=g)
    y = (x + 0.2 * torch.rand(3, 1, 8, 8, generator=g)).clamp(0, 1)
    assert ssim(x, y) == pytest.approx(float(structural_similarity_index_measure(y.double(), x.double(), data_range=1.0)),
                                       rel=1e-9)


def test_prior_guess_and_label_baseline():
    from attacks.metrics import label_baseline, prior_guess

    assert prior_guess([0.7, 0.2, 0.1], 1).tolist() == [0]
    assert sorted(prior_guess([0.5, 0.5], 4).tolist()) == [0, 0, 1, 1]
    # a skewed prior with a big batch: the guess keeps several copies of the frequent class
    assert prior_guess([0.9, 0.05, 0.05], 10).tolist().count(0) >= 8
    labels = torch.tensor([0, 0, 0, 1])
    assert label_baseline(labels, [0.75, 0.25]) == 1.0  # the guess {0, 0, 0, 1} is this very batch
    assert label_baseline(torch.tensor([2]), [0.6, 0.3, 0.1]) == 0.0
    with pytest.raises(ValueError, match="prior"):
        prior_guess([], 3)


def test_a_text_score_has_the_data_free_sentence_beside_it():
    """token_prior (one token per position) is scored as the guess for every example: here it matches 2 of the 3
    real tokens of the first sentence and 1 of 2 of the second (pads unscored)."""
    from attacks.base import Reconstruction
    from attacks.harness import score
    from models.tasks import TaskSpec

    ids = torch.tensor([[5, 6, 7, 0], [5, 9, 0, 0]])
    truth = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    task = TaskSpec(kind="lm", seq_len=4, vocab_size=10)
    s = score(Reconstruction(tokens=ids.clone()), truth, task, token_prior=torch.tensor([5, 6, 8, 0]))
    assert s["token_accuracy"] == 1.0 and s["token_baseline"] == 3 / 5
    assert "token_baseline" not in score(Reconstruction(tokens=ids.clone()), truth, task)
