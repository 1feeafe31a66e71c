import math

import pytest
import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

from medssl.nets.pos_embed import sincos_pos_embed


def sincos_1d(positions, dim, temperature=10000.0):
    """The 1-D formula written out: [sin(x * w_k), cos(x * w_k)], w_k = temperature ** (-k / (dim / 2))."""
    half = dim // 2
    rows = []
    for x in positions:
        freqs = [temperature ** (-k / half) for k in range(half)]
        rows.append([math.sin(x * w) for w in freqs] + [math.cos(x * w) for w in freqs])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("grid, dim", [((4, 6), 16), ((6, 3), 32), ((3, 4, 5), 24), ((2, 3, 4), 48)])
def test_equals_monai_sincos_embedding(grid, dim):
    ours = sincos_pos_embed(grid, dim)
    monai = build_sincos_position_embedding(list(grid), dim, spatial_dims=len(grid))[0]
    assert ours.dtype == torch.float32 and ours.shape == (math.prod(grid), dim)
    torch.testing.assert_close(ours, monai.float(), atol=1e-5, rtol=0)


def test_nd_blocks_follow_the_formula_and_pad_with_zeros():
    grid, dim = (2, 3, 4, 5), 18  # 4 channels per axis, 2 left over
    embed = sincos_pos_embed(grid, dim, temperature=100.0)
    coords = torch.cartesian_prod(*(torch.arange(g) for g in grid))  # row-major, as patchify orders tokens
    for slot, axis in enumerate((1, 0, 2, 3)):
        expected = sincos_1d(coords[:, axis].tolist(), 4, temperature=100.0)
        torch.testing.assert_close(embed[:, 4 * slot : 4 * slot + 4].double(), expected, atol=1e-6, rtol=0)
    assert torch.count_nonzero(embed[:, 16:]) == 0


def test_one_axis_is_the_1d_embedding():
    torch.testing.assert_close(sincos_pos_embed((7,), 6).double(), sincos_1d(range(7), 6), atol=1e-6, rtol=0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dim 3 is too small for a 2-d grid"):
        sincos_pos_embed((4, 4), 3)
    with pytest.raises(ValueError, match=r"\(4, 0\)"):
        sincos_pos_embed((4, 0), 8)
