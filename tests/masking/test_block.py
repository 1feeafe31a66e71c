import math

import pytest
import torch
import torch.nn.functional as F

from medssl.masking import BlockMasking, RandomMasking


@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.75])
@pytest.mark.parametrize("grid", [(14, 14), (6, 6, 6), (8, 8, 1, 4)])
def test_exact_counts_and_valid_indices(mask_checks, grid, ratio):
    check_mask_output, _ = mask_checks
    masking = BlockMasking(ratio, min_num_patches=4)
    keep = int(math.prod(grid) * (1 - ratio))
    assert masking.num_keep(grid) == keep
    check_mask_output(masking(4, grid), 4, grid, keep)


def test_seeding(mask_checks):
    _, check_seeding = mask_checks
    check_seeding(BlockMasking(0.4), (14, 14))


def box_coverage(mask, grid):
    """Per sample, the fraction of masked tokens that lie inside some fully masked 2x..x2 window."""
    avg_pool, max_pool = (F.avg_pool2d, F.max_pool2d) if len(grid) == 2 else (F.avg_pool3d, F.max_pool3d)
    mask = mask.view(mask.shape[0], 1, *grid).float()
    solid_windows = (avg_pool(mask, 2, stride=1) == 1).float()
    covered = max_pool(solid_windows, 2, stride=1, padding=1)[(..., *(slice(0, g) for g in grid))]
    return (covered * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)


@pytest.mark.parametrize("grid", [(14, 14), (6, 6, 6)])
def test_masks_are_made_of_boxes(grid):
    """Block masks are mostly solid boxes; uniform random masks at the same ratio are mostly scattered tokens."""
    seed = torch.Generator().manual_seed(0)
    blocks = box_coverage(BlockMasking(0.4)(32, grid, generator=seed).mask, grid)
    scattered = box_coverage(RandomMasking(0.4)(32, grid, generator=seed).mask, grid)
    assert blocks.min() > 0.45 and blocks.mean() > 0.75
    assert scattered.mean() < 0.3


def test_square_boxes_only_with_unit_aspect():
    """Aspect 1 and volume 4 allow 2x2 squares only, so nearly every masked token lies in a solid 2x2 window."""
    masking = BlockMasking(0.25, min_num_patches=4, max_num_patches=4, min_aspect=1.0, max_aspect=1.0)
    mask = masking(8, (8, 8), generator=torch.Generator().manual_seed(1)).mask
    assert box_coverage(mask, (8, 8)).mean() > 0.75


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_num_patches <= max_num_patches, got 8 and 4"):
        BlockMasking(0.5, min_num_patches=8, max_num_patches=4)
    with pytest.raises(ValueError, match="min_aspect <= max_aspect, got 2.0 and 1.0"):
        BlockMasking(0.5, min_aspect=2.0, max_aspect=1.0)
    with pytest.raises(ValueError, match="max_attempts"):
        BlockMasking(0.5, max_attempts=0)
