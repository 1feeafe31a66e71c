"""Anomaly detection task: reading radiographs, AUROC, the exported map network, evaluation and folder inference."""

import csv
import json

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc
from PIL import Image

from medssl.data.cxr_phantom import ensure_cxr_cohort
from medssl.errors import DataError
from medssl.methods import MaskedAutoencoder, MemMCMAE
from medssl.tasks.anomaly import (
    REFERENCE_FILE,
    AnomalyMapNetwork,
    RadiographDataset,
    anomaly_datalist,
    calibrate_anomaly_network,
    evaluate_anomaly,
    normal_error_reference,
    predict_anomaly_folder,
    read_radiograph,
    report_anomaly,
    roc_auc,
    with_error_reference,
)

MODEL = {"embed_dim": 16, "depth": 2, "num_heads": 2, "decoder_dim": 8, "decoder_depth": 1, "decoder_num_heads": 2,
         "mlp_ratio": 2.0}


def tiny_memmc():
    torch.manual_seed(0)
    return MemMCMAE((32, 32), (8, 8), memory_slots=2, **MODEL)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return ensure_cxr_cohort(tmp_path_factory.mktemp("cxr"), 2, seed=0, size=64, mode="anomaly", num_test=6,
                             num_workers=1, progress=False)


def test_roc_auc_matches_monai_with_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=generator).float()  # many ties
    labels = torch.rand(200, generator=generator) < 0.3
    assert roc_auc(scores, labels) == pytest.approx(compute_roc_auc(scores, labels.long()), abs=1e-9)
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    assert np.isnan(roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])))


def test_read_png_8_and_16_bit_and_dicom(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        image = read_radiograph(tmp_path / name, (32, 32), (8, 8))
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        torch.testing.assert_close(image[0, 0], torch.linspace(0, 1, 32), atol=0.02, rtol=0)
    from medssl.io.dicom_write import PhantomIdentity
    from medssl.io.dx_write import write_dx_image

    write_dx_image(ramp, tmp_path / "c.dcm", spacing_mm=1.0, identity=PhantomIdentity.for_subject("s", 0))
    dicom = read_radiograph(tmp_path / "c.dcm", (32, 32), (8, 8))
    torch.testing.assert_close(dicom, read_radiograph(tmp_path / "a.png", (32, 32), (8, 8)), atol=0.02, rtol=0)


def test_images_smaller_than_the_patch_grid_and_bad_files_are_refused(tmp_path):
    Image.fromarray(np.zeros((3, 40), np.uint8)).save(tmp_path / "tiny.png")
    expected = r"tiny.png: image of shape \(3, 40\) is smaller than the 4x4 patch grid of the 32x32 network \(8x8"
    with pytest.raises(DataError, match=expected):
        read_radiograph(tmp_path / "tiny.png", (32, 32), (8, 8))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="colour.png: expected a greyscale PNG, got mode RGB"):
        read_radiograph(tmp_path / "colour.png", (32, 32), (8, 8))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        read_radiograph(tmp_path / "broken.png", (32, 32), (8, 8))


def test_datalist_and_dataset(cohort, tmp_path):
    test = anomaly_datalist(cohort.parent, "test")
    assert [item["label"] for item in test] == [0, 1, 0, 1, 0, 1]
    assert all(item["mask"] and item["image"].endswith("image.png") for item in test)
    dataset = RadiographDataset(anomaly_datalist(cohort, "training"), (32, 32), (8, 8))
    assert len(dataset) == 2 and dataset[0]["image"].shape == (1, 32, 32)
    with pytest.raises(DataError, match="no anomaly manifest"):
        anomaly_datalist(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="the 'training' split is empty"):
        anomaly_datalist(tmp_path, "training")


def test_map_network_is_deterministic_and_saves_only_the_model_weights():
    model = tiny_memmc()
    network = AnomalyMapNetwork(model, num_masks=3, seed=4)
    assert set(network.state_dict()) == {f"model.{key}" for key in model.state_dict()}
    images = torch.rand(2, 1, 32, 32)
    maps = network(images)
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()
    assert torch.equal(AnomalyMapNetwork(model, 3, seed=4)(images), maps)
    torch.testing.assert_close(network(images[1:]), maps[1:])  # the batch does not change an image's map
    network.train()
    assert not network.training and not model.training
    torch.manual_seed(0)
    assert AnomalyMapNetwork(MaskedAutoencoder((32, 32), (8, 8), **MODEL), 2)(images).shape == (2, 1, 32, 32)


def test_map_smoothing_is_a_mirrored_gaussian_of_the_raw_map():
    from scipy.ndimage import gaussian_filter

    model = tiny_memmc()
    images = torch.rand(2, 1, 32, 32)
    raw = AnomalyMapNetwork(model, num_masks=3, seed=4)(images)
    smoothed = AnomalyMapNetwork(model, num_masks=3, seed=4, smooth_sigma=2.0)(images)
    expected = np.stack([gaussian_filter(m[0].double().numpy(), 2.0, mode="mirror", truncate=4.0) for m in raw])
    np.testing.assert_allclose(smoothed[:, 0].numpy(), expected, atol=1e-4 * float(raw.abs().max()))
    assert smoothed.std() < raw.std()  # smoothing spreads the error, and keeps its mean (up to the mirrored edges)
    torch.testing.assert_close(smoothed.mean(), raw.mean(), rtol=0.05, atol=0.0)
    for bad in (-1.0, 8.0):  # 8 px: a 32 px kernel radius does not fit a 32 px image
        with pytest.raises(ValueError, match="smooth_sigma must be >= 0 with a kernel radius"):
            AnomalyMapNetwork(model, num_masks=3, smooth_sigma=bad)


def test_evaluate_report_and_predict_folder(cohort, tmp_path):
    network = AnomalyMapNetwork(tiny_memmc(), num_masks=2)
    result = evaluate_anomaly(network, anomaly_datalist(cohort, "test"), tmp_path / "maps", batch_size=4,
                              num_figures=2)
    rows, metrics, figures = result
    assert [row["image"] for row in rows] == list(range(6)) and {row["label"] for row in rows} == {0, 1}
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("image_auroc", "image_auroc_mean", "pixel_auroc"))
    assert sorted(path.name for path in figures.iterdir()) == ["anomaly_000.png", "anomaly_001.png"]
    summary = report_anomaly(result, tmp_path / "run", experiment_name="t")
    assert summary["metrics"]["eval_pixel_auroc"] == pytest.approx(metrics["pixel_auroc"])
    with open(summary["csv"]) as handle:
        assert [int(row["label"]) for row in csv.DictReader(handle)] == [0, 1, 0, 1, 0, 1]

    folder = tmp_path / "in"
    folder.mkdir()
    for index, item in enumerate(anomaly_datalist(cohort, "test")[:2]):
        Image.open(item["image"]).save(folder / f"case{index}.png")
    (folder / "notes.txt").write_text("ignored")
    csv_path, _ = predict_anomaly_folder(network, folder, tmp_path / "out")
    with open(csv_path) as handle:
        predicted = list(csv.DictReader(handle))
    assert [row["file"] for row in predicted] == ["case0.png", "case1.png"]
    assert all(float(row["score"]) >= float(row["score_mean"]) >= 0 for row in predicted)
    assert sorted(p.name for p in (tmp_path / "out" / "maps").iterdir()) == ["case0_anomaly.png", "case1_anomaly.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png or .dcm radiograph in empty"):
        predict_anomaly_folder(network, tmp_path / "empty", tmp_path / "o2")


def test_normal_error_reference_standardises_the_maps_per_pixel(cohort, tmp_path, caplog):
    network = AnomalyMapNetwork(tiny_memmc(), num_masks=4, seed=0)
    normals = anomaly_datalist(cohort, "training") + [item for item in anomaly_datalist(cohort, "test")
                                                      if item["label"] == 0]
    assert len(normals) >= 3
    images = torch.stack([read_radiograph(item["image"], (32, 32), (8, 8)) for item in normals])
    raw = network(images)
    reference = normal_error_reference(network, normals, batch_size=2, max_images=len(normals), floor=0.1)
    std = raw.std(dim=0, keepdim=True)
    torch.testing.assert_close(reference["mean"], raw.mean(dim=0, keepdim=True))
    torch.testing.assert_close(reference["scale"], std + 0.1 * std.mean())
    path = tmp_path / "models" / REFERENCE_FILE
    calibrated = calibrate_anomaly_network(network, normals, path, batch_size=2, max_images=len(normals))
    assert calibrated is network and network.has_reference and path.is_file()
    standardised = network(images)
    torch.testing.assert_close(standardised, (raw - reference["mean"]) / reference["scale"])
    torch.testing.assert_close(standardised.mean(dim=0), torch.zeros(1, 32, 32), atol=1e-5, rtol=0)
    assert "error_mean" not in network.state_dict() and "error_scale" not in network.state_dict()

    # inference: the written file gives the same maps; no file -> raw maps and a warning; a damaged file -> DataError
    loaded = with_error_reference(AnomalyMapNetwork(network.model, num_masks=4, seed=0), path)
    torch.testing.assert_close(loaded(images), standardised)
    with caplog.at_level("WARNING"):
        plain = with_error_reference(AnomalyMapNetwork(network.model, num_masks=4, seed=0), tmp_path / "none.st")
    assert not plain.has_reference and "no normal-error reference" in caplog.text
    torch.testing.assert_close(plain(images), raw)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="cannot read the normal-error reference bad.safetensors"):
        with_error_reference(plain, tmp_path / "bad.safetensors")
    with pytest.raises(DataError, match=r"shape \[1, 1, 32, 32\]"):
        plain.set_reference({"mean": torch.zeros(1, 1, 16, 16), "scale": torch.ones(1, 1, 16, 16)})
    with pytest.raises(DataError, match="non-positive scale"):
        plain.set_reference({"mean": torch.zeros(1, 1, 32, 32), "scale": torch.zeros(1, 1, 32, 32)})
    with pytest.raises(DataError, match="at least 2 normal images"):
        normal_error_reference(plain, normals[:1])
    # max_images=0: off, and the stale file goes so that inference scores as the evaluation did
    off = calibrate_anomaly_network(AnomalyMapNetwork(network.model, num_masks=4, seed=0), normals, path, max_images=0)
    assert not off.has_reference and not path.exists()
    torch.testing.assert_close(off(images), raw)
