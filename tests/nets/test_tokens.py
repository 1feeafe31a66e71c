import itertools
import math

import pytest
import torch
from monai.networks.blocks import PatchEmbeddingBlock

from medssl.nets.tokens import gather_tokens, grid_size, patchify, unpatchify

# (channels, spatial shape, patch size): 2D, 3D, 2D+t and 3D+t with anisotropic patches.
CASES = [
    (3, (8, 12), (4, 3)),
    (2, (8, 6, 4), (4, 3, 2)),
    (2, (6, 4, 5), (3, 2, 1)),
    (2, (4, 6, 2, 6), (2, 3, 1, 2)),
]


def reference_patchify(images, patch_size):
    """Slice each patch by hand, row-major over the grid, channel last within a patch."""
    grid = [s // p for s, p in zip(images.shape[2:], patch_size)]
    tokens = []
    for index in itertools.product(*(range(g) for g in grid)):
        box = tuple(slice(i * p, (i + 1) * p) for i, p in zip(index, patch_size))
        patch = images[(slice(None), slice(None), *box)]
        tokens.append(patch.movedim(1, -1).reshape(images.shape[0], -1))
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("channels, spatial, patch", CASES)
def test_patchify_matches_slicing_and_round_trips(channels, spatial, patch):
    images = torch.randn(2, channels, *spatial)
    tokens = patchify(images, patch)
    grid = grid_size(spatial, patch)
    assert tokens.shape == (2, math.prod(grid), math.prod(patch) * channels)
    assert torch.equal(tokens, reference_patchify(images, patch))
    assert torch.equal(unpatchify(tokens, patch, grid, channels), images)


@pytest.mark.parametrize("spatial, patch", [((8, 6), (4, 3)), ((8, 6, 4), (4, 3, 2))])
def test_patchify_matches_monai_patch_embedding_order(spatial, patch):
    block = PatchEmbeddingBlock(
        in_channels=2,
        img_size=spatial,
        patch_size=patch,
        hidden_size=8,
        num_heads=1,
        proj_type="perceptron",
        spatial_dims=len(spatial),
    )
    rearrange = block.patch_embeddings[0]  # MONAI's own einops pattern, before its linear projection
    images = torch.randn(2, 2, *spatial)
    assert torch.equal(patchify(images, patch), rearrange(images))


def test_grid_size_errors_name_the_axis():
    assert grid_size((192, 192, 16), (16, 16, 1)) == (12, 12, 16)
    with pytest.raises(ValueError, match=r"axis 1: image size 10 is not divisible by patch size 4"):
        grid_size((8, 10), (4, 4))
    with pytest.raises(ValueError, match=r"\(8, 10\).*\(4,\)"):
        grid_size((8, 10), (4,))
    with pytest.raises(ValueError, match="axis 0"):
        grid_size((0, 4), (1, 1))


def test_patchify_and_unpatchify_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        patchify(torch.zeros(2, 3), (1,))
    with pytest.raises(ValueError, match=r"\[B, 4, 12\].*\(1, 4, 11\)"):
        unpatchify(torch.zeros(1, 4, 11), (2, 2), (2, 2), 3)
    with pytest.raises(ValueError, match="same"):
        unpatchify(torch.zeros(1, 4, 12), (2, 2), (4,), 3)


def test_gather_tokens_matches_advanced_indexing():
    tokens = torch.randn(3, 10, 4)
    ids = torch.stack([torch.randperm(10)[:6] for _ in range(3)])
    expected = tokens[torch.arange(3)[:, None], ids]
    assert torch.equal(gather_tokens(tokens, ids), expected)
    assert torch.equal(gather_tokens(tokens, ids.int()), expected)


def test_gather_tokens_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(3, 10, 4\).*\(2, 5\)"):
        gather_tokens(torch.zeros(3, 10, 4), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        gather_tokens(torch.zeros(3, 10, 4), torch.zeros(3, 5))
