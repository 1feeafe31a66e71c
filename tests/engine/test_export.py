"""ViewEncoder (one view of a multi-view encoder as an image -> feature map network) and save_state_dict."""

import warnings

import numpy as np
import pytest
import torch

from medssl.engine.export import ViewEncoder, save_state_dict
from medssl.methods.cine_mae import CineMAE
from medssl.methods.mae import ENCODER_PREFIX

VIEWS = {
    "sax": {"image_size": (16, 16, 4), "patch_size": (4, 4, 1), "in_channels": 1},  # grid 4x4x4
    "lax_4c": {"image_size": (16, 8), "patch_size": (4, 4), "in_channels": 1},  # grid 4x2
}
TINY = {"embed_dim": 24, "depth": 2, "num_heads": 2, "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
# Traced (plain F.linear) against eager (oneDNN products on CPU) float32 features of unit scale.
ATOL = 1e-5


@pytest.fixture
def autoencoder():
    torch.manual_seed(0)
    return CineMAE(VIEWS, **TINY).eval()


def images(view, batch=2, seed=0):
    return torch.rand(batch, 1, *VIEWS[view]["image_size"], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("view, grid", [("sax", (4, 4, 4)), ("lax_4c", (4, 2))])
def test_feature_map_puts_each_encoded_token_at_its_patch(autoencoder, view, grid):
    exported = ViewEncoder(autoencoder.encoder, view)
    x = images(view)
    with torch.no_grad():
        features = exported(x)
        tokens = autoencoder.encoder({view: x})[view]  # [B, N, D], N in row-major grid order
    assert features.shape == (2, TINY["embed_dim"], *grid)
    for position in np.ndindex(*grid):
        index = np.ravel_multi_index(position, grid)
        torch.testing.assert_close(features[(slice(None), slice(None), *position)], tokens[:, index], rtol=0, atol=0)


def test_unknown_view_is_refused(autoencoder):
    with pytest.raises(ValueError, match=r"view 'lax_2c' is not one of the encoder's views \['sax', 'lax_4c'\]"):
        ViewEncoder(autoencoder.encoder, "lax_2c")


def test_image_of_the_wrong_size_is_refused_with_its_shape(autoencoder):
    message = r"view 'sax': expected images \[B, 1, 16, 16, 4\].*got shape \(2, 1, 16, 16, 5\)"
    with pytest.raises(ValueError, match=message):
        ViewEncoder(autoencoder.encoder, "sax")(torch.rand(2, 1, 16, 16, 5))


def test_state_dict_is_the_encoder_part_of_the_autoencoder(autoencoder):
    exported = ViewEncoder(autoencoder.encoder, "sax")
    encoder_part = {key: value for key, value in autoencoder.state_dict().items() if key.startswith(ENCODER_PREFIX)}
    state = exported.state_dict()
    assert state.keys() == encoder_part.keys()
    assert all(state[key].data_ptr() == encoder_part[key].data_ptr() for key in state)  # shared, not copied


def test_trace_matches_eager_for_any_batch_and_uses_no_cpu_only_kernels(autoencoder):
    exported = ViewEncoder(autoencoder.encoder, "sax").eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings: the geometry checks become constants, as intended
        traced = torch.jit.trace(exported, images("sax", batch=1))
        for batch in (1, 3):
            x = images("sax", batch=batch, seed=batch)
            expected, actual = exported(x), traced(x)
            assert actual.shape == expected.shape == (batch, TINY["embed_dim"], 4, 4, 4)
            assert (actual - expected).abs().max().item() <= ATOL
    # oneDNN's linear op only runs on CPU tensors; the exported graph must use aten::linear to run on GPUs too.
    graph = str(traced.inlined_graph)
    assert "mkldnn" not in graph and "aten::linear" in graph


def test_save_state_dict_round_trip(autoencoder, tmp_path):
    exported = ViewEncoder(autoencoder.encoder, "sax")
    path = save_state_dict(exported, tmp_path / "models" / "sax_encoder.pt")
    assert path == tmp_path / "models" / "sax_encoder.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["sax_encoder.pt"]  # no temporary file left behind

    state = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    fresh = ViewEncoder(CineMAE(VIEWS, **TINY).encoder, "sax").eval()
    x = images("sax")
    with torch.no_grad():
        assert not torch.allclose(fresh(x), exported(x))
        fresh.load_state_dict(state)  # strict
        torch.testing.assert_close(fresh(x), exported(x), rtol=0, atol=0)
