import pytest
import torch

from medssl.masking import RandomMasking


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(14, 14), (4, 4, 4), (3, 5, 2, 4)])
def test_exact_counts_and_valid_indices(mask_checks, grid, ratio):
    check_mask_output, _ = mask_checks
    masking = RandomMasking(ratio)
    n = torch.Size(grid).numel()
    assert masking.num_keep(grid) == int(n * (1 - ratio))
    check_mask_output(masking(3, grid), 3, grid, int(n * (1 - ratio)))


def test_seeding(mask_checks):
    _, check_seeding = mask_checks
    check_seeding(RandomMasking(0.75), (6, 6))


def test_matches_mae_argsort_of_noise():
    """Same noise as MAE draws (uniform, one per token): keep the lowest, restore = argsort(argsort)."""
    out = RandomMasking(0.75)(5, (8, 8), generator=torch.Generator().manual_seed(3))
    noise = torch.rand(5, 64, generator=torch.Generator().manual_seed(3))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    assert torch.equal(out.ids_keep, ids_shuffle[:, :16])
    assert torch.equal(out.ids_restore, ids_restore)
    assert torch.equal(out.mask, ids_restore >= 16)


def test_every_token_is_masked_at_the_ratio():
    mask = RandomMasking(0.75)(4000, (4, 4), generator=torch.Generator().manual_seed(0)).mask
    assert torch.allclose(mask.float().mean(dim=0), torch.full((16,), 0.75), atol=0.04)


def test_rejects_bad_ratios_and_grids():
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match=f"mask_ratio must be in \\[0, 1\\), got {ratio}"):
            RandomMasking(ratio)
    with pytest.raises(ValueError, match=r"leaves no visible token on grid \(3,\)"):
        RandomMasking(0.9)(1, (3,))
    with pytest.raises(ValueError, match=r"\(4, 0\)"):
        RandomMasking(0.5)(1, (4, 0))
    with pytest.raises(ValueError, match="batch_size"):
        RandomMasking(0.5)(0, (4, 4))
