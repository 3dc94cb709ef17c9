from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medrag_ray.losses.info_nce import clip_info_nce, fused_info_nce, similarity_matrix


def _nll(logit: float, row: list[float]) -> float:
    return -math.log(math.exp(logit) / sum(math.exp(x) for x in row))


def test_clip_info_nce_matches_hand_computed_2x2() -> None:
    # Images e0, e1; texts e0 and (0.6, 0.8) -> S = [[1.0, 0.6], [0.0, 0.8]] (row: image, column: text).
    image = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # norms differ: Eq. 1 normalizes
    text = torch.tensor([[5.0, 0.0], [0.6, 0.8]])
    assert torch.allclose(similarity_matrix(image, text), torch.tensor([[1.0, 0.6], [0.0, 0.8]]))
    for scale in (1.0, 2.0):
        s00, s01, s10, s11 = 1.0 * scale, 0.6 * scale, 0.0, 0.8 * scale
        loss_img = (_nll(s00, [s00, s01]) + _nll(s11, [s10, s11])) / 2
        loss_txt = (_nll(s00, [s00, s10]) + _nll(s11, [s01, s11])) / 2
        expected = (loss_img + loss_txt) / 2
        got = clip_info_nce(image, text, logit_scale=scale)
        assert got.item() == pytest.approx(expected, rel=1e-6)
        assert clip_info_nce(image, text, temperature=1 / scale).item() == pytest.approx(expected, rel=1e-6)
    # Without a scale, Eq. 1 is written with the raw cosine similarities.
    assert clip_info_nce(image, text).item() == pytest.approx(
        ((_nll(1.0, [1.0, 0.6]) + _nll(0.8, [0.0, 0.8])) / 2 + (_nll(1.0, [1.0, 0.0]) + _nll(0.8, [0.6, 0.8])) / 2)
        / 2,
        rel=1e-6,
    )


def test_clip_info_nce_symmetric_under_swapping_roles() -> None:
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    a = clip_info_nce(image, text, logit_scale=10.0)
    b = clip_info_nce(text, image, logit_scale=10.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # With a symmetric S, L_img == L_txt: the one-directional loss equals the symmetric one.
    emb = torch.linalg.qr(torch.randn(5, 5, generator=gen))[0]  # orthonormal rows
    mixed = F.normalize(emb + 0.3 * emb.roll(1, 0) + 0.3 * emb.roll(-1, 0), dim=-1)  # image == text: S = X X^T
    s = similarity_matrix(mixed, mixed)
    assert torch.allclose(s, s.T, atol=1e-6)
    one_direction = F.cross_entropy(s * 4.0, torch.arange(5))
    assert clip_info_nce(mixed, mixed, logit_scale=4.0).item() == pytest.approx(one_direction.item(), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_clip_info_nce_identical_embeddings_is_log_n(n: int) -> None:
    emb = torch.tensor([[0.3, -1.2, 2.0]]).repeat(n, 1)
    assert clip_info_nce(emb, emb.clone(), logit_scale=50.0).item() == pytest.approx(math.log(n), abs=1e-6)


def test_clip_info_nce_decreases_as_diagonal_similarity_increases() -> None:
    n = 4
    image = torch.cat([torch.eye(n), torch.zeros(n, 1)], dim=1)
    losses = []
    for theta in (1.4, 1.0, 0.6, 0.2, 0.0):
        # text_i = cos(theta) e_i + sin(theta) e_extra: S_ii = cos(theta), S_ij = 0 for i != j.
        text = torch.cat([math.cos(theta) * torch.eye(n), math.sin(theta) * torch.ones(n, 1)], dim=1)
        loss = clip_info_nce(image, text).item()
        c = math.cos(theta)
        assert loss == pytest.approx(-math.log(math.exp(c) / (math.exp(c) + n - 1)), rel=1e-5)
        losses.append(loss)
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))


def test_clip_info_nce_matches_open_clip_cliploss() -> None:
    from open_clip.loss import ClipLoss

    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
    logit_scale = torch.tensor(math.log(1 / 0.07)).exp()
    ours = clip_info_nce(image, text, logit_scale=logit_scale)
    reference = ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), logit_scale)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert ours.item() > 0.5  # random pairs: far from a solved problem, so the comparison is not trivial


def test_clip_info_nce_gradient_reaches_logit_scale_and_embeddings() -> None:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(4, 6, generator=gen, requires_grad=True)
    text = torch.randn(4, 6, generator=gen, requires_grad=True)
    log_scale = torch.tensor(2.0, requires_grad=True)
    clip_info_nce(image, text, logit_scale=log_scale.exp()).backward()
    assert log_scale.grad is not None and log_scale.grad.item() != 0.0
    assert image.grad is not None and image.grad.abs().sum().item() > 0


def test_clip_info_nce_rejects_bad_inputs() -> None:
    emb = torch.randn(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        clip_info_nce(emb, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        clip_info_nce(emb[0], emb[0])
    with pytest.raises(ValueError, match="not both"):
        clip_info_nce(emb, emb, logit_scale=2.0, temperature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        clip_info_nce(emb, emb, temperature=0.0)
    with pytest.raises(ValueError, match="logit_scale.exp"):
        clip_info_nce(emb, emb, logit_scale=-1.0)
    with pytest.raises(ValueError, match="empty"):
        clip_info_nce(torch.zeros(0, 4), torch.zeros(0, 4))


def test_fused_info_nce_single_positive_is_papers_formula() -> None:
    scores = torch.tensor([[0.9, 0.2, -0.1], [0.1, 0.5, 0.4]])
    positive = torch.tensor([[True, False, False], [False, False, True]])
    tau = 0.5
    row0 = -math.log(math.exp(0.9 / tau) / (math.exp(0.9 / tau) + math.exp(0.2 / tau) + math.exp(-0.1 / tau)))
    row1 = -math.log(math.exp(0.4 / tau) / (math.exp(0.4 / tau) + math.exp(0.1 / tau) + math.exp(0.5 / tau)))
    got = fused_info_nce(scores, positive, temperature=tau)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert got.item() == pytest.approx(F.cross_entropy(scores / tau, torch.tensor([0, 2])).item(), rel=1e-6)


def test_fused_info_nce_multiple_positives_contrast_only_negatives() -> None:
    scores = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    positive = torch.tensor([[True, True, False, False]])
    neg = [0.0, -0.5]
    p0 = -math.log(math.exp(1.0) / (math.exp(1.0) + sum(math.exp(x) for x in neg)))
    p1 = -math.log(math.exp(0.5) / (math.exp(0.5) + sum(math.exp(x) for x in neg)))
    assert fused_info_nce(scores, positive).item() == pytest.approx((p0 + p1) / 2, rel=1e-6)


def test_fused_info_nce_candidate_mask_drops_padding_and_all_positive_row_is_zero() -> None:
    scores = torch.tensor([[2.0, 1.0, 100.0], [0.3, 0.7, 0.0]])
    positive = torch.tensor([[True, False, False], [True, True, False]])
    valid = torch.tensor([[True, True, False], [True, True, False]])
    row0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.0)))  # the padded 100.0 is ignored
    row1 = 0.0  # both valid candidates are positives: no negatives, -log 1
    got = fused_info_nce(scores, positive, candidate_mask=valid)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_fused_info_nce_gradient_raises_positive_lowers_negatives() -> None:
    scores = torch.tensor([[0.1, 0.3, 0.2]], requires_grad=True)
    fused_info_nce(scores, torch.tensor([[True, False, False]])).backward()
    assert scores.grad is not None
    assert scores.grad[0, 0] < 0 and scores.grad[0, 1] > 0 and scores.grad[0, 2] > 0
    assert torch.isfinite(scores.grad).all()


def test_fused_info_nce_rejects_bad_inputs() -> None:
    scores = torch.zeros(2, 3)
    pos = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no positive"):
        fused_info_nce(scores, pos)
    with pytest.raises(ValueError, match="bool"):
        fused_info_nce(scores, pos.long())
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        fused_info_nce(scores[0], pos[0])
    with pytest.raises(ValueError, match="temperature"):
        fused_info_nce(scores, pos, temperature=0.0)
    ok = torch.tensor([[True, False, False], [False, True, False]])
    with pytest.raises(ValueError, match="real candidates"):
        fused_info_nce(scores, ok, candidate_mask=torch.tensor([[True, True, True], [True, False, True]]))
