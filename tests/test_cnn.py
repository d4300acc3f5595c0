"""The digits CNN family: shapes across widths, training, determinism, save/load as a frozen backbone."""

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from artifacts import ArtifactError, read_json, sha256_file, write_json
from embeddings.backbone import WeightsError, load_backbone
from embeddings.cnn import (
    CNNConfig,
    CNNTrainConfig,
    DigitsCNN,
    cnn_transform,
    images_to_tensor,
    load_cnn,
    save_cnn,
    train_cnn,
)
from embeddings.digits import DigitsSource, load_digits_images

ROOT = Path(__file__).resolve().parents[1]
QUICK = CNNTrainConfig(epochs=1, batch_size=128)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained briefly on the digits train split (the default split, seed 0)."""
    return train_cnn(CNNConfig(width=6), CNNTrainConfig(epochs=6), seed=0)


@pytest.mark.parametrize("width", [1, 4, 40])
def test_width_family_shapes(width):
    config = CNNConfig(width=width)
    model = DigitsCNN(config)
    x = torch.randn(5, 1, 32, 32)
    assert config.n_features == 25 * width
    assert model.features(x).shape == (5, config.n_features)
    assert model(x).shape == (5, 10)
    torch.testing.assert_close(model.head(model.features(x)), model(x))


def test_penultimate_widths_span_the_papers_range():
    assert CNNConfig.for_n_features(25).n_features == 25
    assert CNNConfig.for_n_features(1000).n_features == 1000
    assert CNNConfig.for_n_features(1152).width == 46
    assert CNNConfig(width=8, image_size=28).n_features == 8 * 16


def test_config_errors_name_the_flags():
    with pytest.raises(ValueError, match="--width"):
        CNNConfig(width=0)
    with pytest.raises(ValueError, match="--epochs"):
        CNNTrainConfig(epochs=-1)
    with pytest.raises(ValueError, match="--lr"):
        CNNTrainConfig(lr=0)
    with pytest.raises(ValueError, match="image_size"):
        CNNConfig(image_size=12)


def test_transform_matches_the_training_tensors():
    config = CNNConfig()
    source = DigitsSource()
    images, _ = load_digits_images()
    transform = cnn_transform(config)
    rows = [0, 17, 1796]
    via_pil = torch.stack([transform(source.load(i)) for i in rows])
    torch.testing.assert_close(via_pil, images_to_tensor(images[rows], config), rtol=0, atol=1e-6)
    assert via_pil.shape == (3, 1, 32, 32)


def test_training_reaches_good_accuracy_quickly(trained):
    model, metrics = trained
    assert metrics["train_accuracy"] > 0.95
    assert metrics["val_accuracy"] > 0.9 and metrics["test_accuracy"] > 0.9
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (1079, 359, 359)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_untrained_model_is_near_chance():
    _, metrics = train_cnn(CNNConfig(width=2), CNNTrainConfig(epochs=0), seed=0)
    assert metrics["val_accuracy"] < 0.4


def test_training_is_deterministic_for_a_seed_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = train_cnn(CNNConfig(width=2), QUICK, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = train_cnn(CNNConfig(width=2), QUICK, seed=5)
    c, _ = train_cnn(CNNConfig(width=2), QUICK, seed=6)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_training_on_given_arrays():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32), dtype=np.uint8)
    labels = np.arange(40) % 2
    model, metrics = train_cnn(CNNConfig(width=1, n_classes=2), QUICK, images=images, labels=labels)
    assert metrics["n_train"] == 40 and 0 <= metrics["train_accuracy"] <= 1
    with pytest.raises(ValueError, match="labels"):
        train_cnn(CNNConfig(width=1, n_classes=2), QUICK, images=images, labels=labels + 1)


def test_save_load_round_trip_as_a_frozen_backbone(tmp_path, trained):
    model, metrics = trained
    out = save_cnn(model, tmp_path / "cnn", train=CNNTrainConfig(epochs=6), seed=0, metrics=metrics)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing partial left behind
    config, meta = read_json(out / "config.json"), read_json(out / "meta.json")
    assert config["architecture"] == "digits-cnn" and config["model"]["width"] == 6 and config["train"]["epochs"] == 6
    assert meta["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert meta["weights_sha256"] == sha256_file(out / "model.safetensors")

    backbone = load_backbone("digits-cnn", weights=str(out))
    assert backbone.info["weights_source"] == f"file:{(out / 'model.safetensors').resolve()}"
    assert backbone.info["weights_sha256"] == meta["weights_sha256"]
    assert backbone.info["output_kind"] == "pre_logits" and backbone.d == 150 and backbone.info["normalize"] is False
    assert backbone.info["preprocessing"]["input_size"] == [1, 32, 32]
    source = DigitsSource()
    x = torch.stack([backbone.transform(source.load(i)) for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(backbone.features(x), model.features(x), rtol=0, atol=0)
        logits = load_backbone("digits-cnn", weights=str(out / "model.safetensors"), output="head").features(x)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)

    with pytest.raises(ArtifactError, match="--overwrite"):
        save_cnn(model, out)
    save_cnn(model, out, overwrite=True)


def test_split_preprocessing_equals_the_transform():
    """The digits CNN's transform (greyscale, resize, to-tensor, normalise) splits like timm's."""
    backbone = load_backbone("digits-cnn", weights="random")
    source = DigitsSource()
    images = [source.load(i) for i in range(8)]
    parts = [backbone.image_transform(im) for im in images]
    assert all(t.dtype == torch.uint8 and t.shape == (1, 32, 32) for t in parts)
    x = backbone.normalize_batch(torch.stack(parts))
    torch.testing.assert_close(x, torch.stack([backbone.transform(im) for im in images]), rtol=0, atol=1e-5)


def test_loading_errors_say_what_to_run(tmp_path, trained):
    with pytest.raises(WeightsError, match="train_backbone.py"):
        load_backbone("digits-cnn", weights=str(tmp_path / "nothing"))
    out = save_cnn(trained[0], tmp_path / "cnn")
    config = read_json(out / "config.json")
    config["model"]["width"] = 7
    write_json(out / "config.json", config)
    with pytest.raises(ArtifactError, match=r"model.safetensors does not match .*config.json.*other shapes"):
        load_cnn(out)


def test_train_backbone_script(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cnn"
    argv = ["train_backbone.py", "--out", str(out), "--width", "1", "--epochs", "1", "--seed", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "scripts" / "train_backbone.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "test" in printed and str(out) in printed
    assert read_json(out / "config.json")["seed"] == 3
    assert load_cnn(out).config.width == 1
    with pytest.raises(SystemExit):  # refuses to replace the directory without --overwrite
        runpy.run_path(str(ROOT / "scripts" / "train_backbone.py"), run_name="__main__")


@pytest.mark.slow
@pytest.mark.parametrize("width", [8, 40])
def test_moderate_widths_exceed_95_percent(width):
    _, metrics = train_cnn(CNNConfig(width=width), seed=0)
    assert metrics["test_accuracy"] > 0.95
