"""Pseudo masks: code mode reproduces the released procedure (numpy reference, 9/64 foreground),
paper mode's body mask and bilateral smoothing do what they claim, nothing carries gradient."""

import numpy as np
import pytest
import torch

from model.pseudo_mask import bilateral_binary, otsu_body_mask, per_image_quantile, pseudo_mask


def _synthetic_chest(b: int = 2, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ImageNet-normalised 3-channel images: dark air, a bright elliptic body, two dark lungs inside.
    -> (image [B,3,H,W], body [H,W] bool, lungs [H,W] bool)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    body = (xx / 0.8) ** 2 + (yy / 0.95) ** 2 < 1
    lungs = (((xx + 0.35) / 0.25) ** 2 + (yy / 0.5) ** 2 < 1) | (((xx - 0.35) / 0.25) ** 2 + (yy / 0.5) ** 2 < 1)
    grey = torch.where(body, 0.8, 0.02) - 0.55 * lungs.float() + 0.03 * torch.randn(b, size, size, generator=g)
    image = ((grey - 0.485) / 0.229)[:, None].repeat(1, 3, 1, 1)
    return image, body, lungs


def _edge_count(mask: torch.Tensor) -> torch.Tensor:
    """Number of 4-neighbour pixel pairs with different labels (boundary length), per image."""
    m = mask.bool()
    return ((m[..., 1:, :] != m[..., :-1, :]).sum((1, 2, 3)) + (m[..., :, 1:] != m[..., :, :-1]).sum((1, 2, 3))).float()


def test_code_mode_matches_numpy_reference_and_keeps_9_of_64_cells():
    g = torch.Generator().manual_seed(0)
    attention = torch.rand(5, 4, 64, generator=g).softmax(dim=-1).reshape(5, 4, 8, 8)  # like MHA weights
    image = torch.zeros(5, 3, 64, 64)
    mask = pseudo_mask(attention, image, mode="code", quantile=0.85)
    assert mask.shape == (5, 1, 64, 64) and mask.dtype == torch.float32
    # The released procedure: head mean, nearest resize, per-image np.quantile, strict '>'.
    att = attention.mean(dim=1).numpy()
    up = np.kron(att, np.ones((8, 8), dtype=att.dtype))  # nearest 8x8 -> 64x64
    ref = (up > np.quantile(up, 0.85, axis=(1, 2))[:, None, None]).astype(np.float32)
    np.testing.assert_array_equal(mask[:, 0].numpy(), ref)
    np.testing.assert_allclose(mask.mean(dim=(1, 2, 3)).numpy(), 9 / 64)


def test_no_gradient_flows_into_the_target():
    attention = torch.rand(2, 4, 4, 4, requires_grad=True)
    image, _, _ = _synthetic_chest(2, 128)
    for mode in ("paper", "code"):
        mask = pseudo_mask(attention, image, mode=mode)
        assert not mask.requires_grad and mask.grad_fn is None
    with torch.enable_grad():
        assert not pseudo_mask(attention * 2, image).requires_grad


def test_per_image_quantile_matches_numpy():
    x = torch.randn(3, 1, 17, 13)
    for q in (0.5, 0.85, 0.99):
        expected = np.quantile(x.numpy().reshape(3, -1), q, axis=1)
        np.testing.assert_allclose(per_image_quantile(x, q).flatten().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_body_mask_fills_the_lungs_and_zeroes_the_background():
    image, body, lungs = _synthetic_chest(2, 128)
    found = otsu_body_mask(image)
    assert found.shape == (2, 1, 128, 128)
    agreement = (found[:, 0] == body).float().mean().item()
    assert agreement > 0.99
    assert found[:, 0][:, lungs].all()  # dark lungs are inside the body (hole filling)
    assert not found[:, 0, :4, :4].any()  # air in the corners is outside
    # Attention that peaks in the background still yields no foreground there.
    attention = torch.zeros(2, 4, 4, 4)
    attention[..., 0, 0] = 1.0  # top-left corner cell, outside the body
    attention = attention + 0.01 * torch.rand(2, 4, 4, 4)
    mask = pseudo_mask(attention, image, mode="paper", body_mask=True)
    assert mask[:, 0][:, ~body].sum() == 0
    assert mask.sum() > 0
    unmasked = pseudo_mask(attention, image, mode="paper", body_mask=False)
    assert unmasked[:, 0, :8, :8].sum() > 0  # without the body mask the corner wins


def test_batched_result_equals_per_image_results():
    g = torch.Generator().manual_seed(3)
    attention = torch.rand(3, 4, 4, 4, generator=g)
    image, _, _ = _synthetic_chest(3, 128, seed=1)
    batched = pseudo_mask(attention, image, mode="paper")
    single = torch.cat([pseudo_mask(attention[i : i + 1], image[i : i + 1], mode="paper") for i in range(3)])
    assert torch.equal(batched, single)


def test_bilateral_binary_rounds_blocks_without_moving_straight_edges():
    m = torch.zeros(1, 1, 48, 48, dtype=torch.bool)
    m[..., :, 24:] = True  # a straight vertical edge
    m[..., 10, 5] = True  # an isolated speck
    m[..., 30, 36] = False  # a pinhole
    out = bilateral_binary(m, sigma_space=2.0, sigma_range=1.0)
    assert not out[..., 10, 5] and out[..., 30, 36]  # speck gone, hole filled
    assert torch.equal(out[..., 20:28, :], (torch.arange(48) >= 24).expand(1, 1, 8, 48))  # edge unchanged
    square = torch.zeros(1, 1, 48, 48, dtype=torch.bool)
    square[..., 16:32, 16:32] = True
    rounded = bilateral_binary(square, sigma_space=3.0, sigma_range=1.0)
    assert not rounded[..., 16, 16] and rounded[..., 24, 24]  # corners cut, centre kept
    assert rounded.sum() < square.sum()


def test_paper_mode_is_smoother_than_code_mode():
    # Code-mode masks are unions of whole attention cells: every boundary lies on the 32-px cell
    # grid (blocky). Paper-mode boundaries follow the bilinear attention contour instead, and the
    # bilateral step shortens them further (spurs/specks removed, notches filled).
    # (A union of axis-aligned squares already has minimal 4-neighbour boundary length for its
    # area, so "blocky" shows up as grid alignment, not as a longer boundary.)
    g = torch.Generator().manual_seed(4)
    attention = torch.rand(8, 4, 8, 8, generator=g)
    image = torch.ones(8, 3, 256, 256)
    code = pseudo_mask(attention, image, mode="code")
    paper = pseudo_mask(attention, image, mode="paper", body_mask=False, smoothing=True)
    unsmoothed = pseudo_mask(attention, image, mode="paper", body_mask=False, smoothing=False)

    def off_grid_fraction(mask):
        m = mask.bool()
        vertical = m[..., :, 1:] != m[..., :, :-1]  # boundary between columns j and j+1
        on_grid = torch.arange(1, 256) % 32 == 0
        return (vertical[..., ~on_grid].sum() / vertical.sum()).item()

    assert off_grid_fraction(code) == 0.0
    assert off_grid_fraction(paper) > 0.8
    assert (_edge_count(paper) < _edge_count(unsmoothed)).float().mean() >= 0.75
    assert _edge_count(paper).mean() < 0.95 * _edge_count(unsmoothed).mean()
    # Both modes keep roughly the top 15% of the image.
    assert paper.mean().item() == pytest.approx(0.15, abs=0.03)
    assert code.mean().item() == pytest.approx(9 / 64, abs=1e-6)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="pseudo_mask_mode"):
        pseudo_mask(torch.rand(1, 4, 2, 2), torch.zeros(1, 3, 64, 64), mode="median")
