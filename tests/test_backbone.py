"""Frozen timm backbones: weights from local files, random or the hub; preprocessing; output kinds."""

import dataclasses

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from artifacts import sha256_file
from embeddings.backbone import WeightsError, is_embedding_head, load_backbone, read_state_dict

SMALL = "test_resnet"  # one of timm's tiny test models: fast on CPU


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def _batch(backbone, n=3):
    return torch.stack([backbone.transform(im) for im in _images(n)])


@pytest.fixture(scope="module")
def reference():
    """A randomly initialised timm model and its weights, as a checkpoint would hold them."""
    torch.manual_seed(123)
    model = timm.create_model(SMALL, pretrained=False).eval()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    return model, state


def _pre_logits(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def test_random_weights_by_name_are_frozen_and_described():
    b = load_backbone(SMALL, weights="random")
    assert not b.model.training and not any(p.requires_grad for p in b.model.parameters())
    info = b.info
    assert info["name"] == SMALL and info["weights_source"] == "random" and info["weights_seed"] == 0
    assert len(info["weights_sha256"]) == 64  # of the tensors: random weights have no file
    assert info["output_kind"] == "pre_logits" and info["normalize"] is False
    assert info["d"] == b.model.num_features == b.d
    x = _batch(b)
    z = b.features(x)
    assert z.shape == (3, info["d"]) and z.dtype == torch.float32
    assert z.requires_grad is False


def test_transform_is_timms_eval_transform_of_the_model():
    b = load_backbone("test_vit", weights="random")
    cfg = timm.data.resolve_model_data_config(b.model)
    expected = timm.data.create_transform(**cfg, is_training=False)
    for im in _images(2):
        torch.testing.assert_close(b.transform(im), expected(im), rtol=0, atol=0)
    pre = b.info["preprocessing"]
    assert pre["input_size"] == list(cfg["input_size"]) == [3, 160, 160]
    assert pre["interpolation"] == cfg["interpolation"] and pre["crop_pct"] == cfg["crop_pct"]
    assert pre["mean"] == list(cfg["mean"]) and pre["std"] == list(cfg["std"]) and pre["crop_mode"] == "center"
    assert b.transform(_images(1)[0]).shape == (3, 160, 160)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_split_preprocessing_equals_the_transform(name):
    """image_transform (uint8, per image) then normalize_batch (per batch) gives the reference's floats."""
    b = load_backbone(name, weights="random")
    images = _images(4)
    parts = [b.image_transform(im) for im in images]
    assert all(t.dtype == torch.uint8 and t.shape == (3, 160, 160) for t in parts)
    x = b.normalize_batch(torch.stack(parts))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, _batch(b, 4), rtol=0, atol=1e-5)
    # a channels-last batch, as extraction stacks it, keeps its layout and its values
    cl = b.normalize_batch(torch.stack(parts).contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        b.normalize_batch(x)  # an already normalised batch must not be normalised twice


@pytest.mark.parametrize(
    "make",
    [
        lambda t: transforms.Compose(t.transforms[:-1]),  # no Normalize: floats in 0..1
        lambda t: transforms.Compose([*t.transforms, transforms.Lambda(lambda x: x.flip(-1))]),  # a step after it
        lambda t: (lambda im: t(im) * 2),  # not a Compose at all
        lambda t: transforms.Compose([*t.transforms[:-1], transforms.Normalize([0.5] * 3, [0.0, 1.0, 1.0])]),
    ],
    ids=["no-normalize", "step-after-normalize", "function", "zero-std"],
)
def test_unusual_transforms_fall_back_to_the_full_transform(make):
    b = load_backbone(SMALL, weights="random")
    odd = dataclasses.replace(b, transform=make(b.transform))
    assert odd.image_transform is odd.transform
    im = _images(1)[0]
    try:
        expected = odd.transform(im)
    except ValueError:  # Normalize refuses a zero std: the fallback keeps its error
        with pytest.raises(ValueError, match="std"):
            odd.image_transform(im)
        return
    batch = torch.stack([odd.image_transform(im)])
    assert odd.normalize_batch(batch) is batch  # the identity: nothing left to do per batch
    torch.testing.assert_close(batch[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "bin-wrapped"])
def test_local_file_round_trip_gives_the_same_features(tmp_path, reference, fmt):
    model, state = reference
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    else:  # a training checkpoint: wrapped, saved from DistributedDataParallel, with non-tensor entries
        path = tmp_path / "w.bin"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    b = load_backbone(SMALL, weights=str(path))
    assert b.info["weights_source"] == f"file:{path.resolve()}"
    assert b.info["weights_sha256"] == sha256_file(path)
    x = _batch(b)
    torch.testing.assert_close(b.features(x), _pre_logits(model, x), rtol=0, atol=0)


def test_plain_files_are_not_marked_converted(tmp_path, reference):
    _, state = reference
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    assert load_backbone(SMALL, weights=str(path)).info["weights_converted"] is False


def test_a_weights_folder_loads_its_weights_file(tmp_path, reference):
    model, state = reference
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file(state, str(folder / "model.safetensors"))
    b = load_backbone(SMALL, weights=str(folder))
    assert b.info["weights_source"] == f"file:{(folder / 'model.safetensors').resolve()}"
    x = _batch(b)
    torch.testing.assert_close(b.features(x), _pre_logits(model, x), rtol=0, atol=0)


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="holds none of model.safetensors"):
        load_backbone(SMALL, weights=str(tmp_path))


def test_weights_at_another_input_size_load_through_timms_conversion(tmp_path):
    """A ViT saved at 64 px has fewer position embeddings; timm's filter resamples them and info says so."""
    other = timm.create_model("test_vit", pretrained=False, img_size=64)
    path = tmp_path / "vit64.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    b = load_backbone("test_vit", weights=str(path))
    assert b.info["weights_converted"] is True
    assert b.model.pos_embed.shape[1] != other.pos_embed.shape[1]
    torch.testing.assert_close(b.model.patch_embed.proj.weight, other.patch_embed.proj.weight, rtol=0, atol=0)


def test_strict_load_names_the_file_and_the_keys(tmp_path, reference):
    _, state = reference
    name = sorted(state)[0]
    broken = {k: v for k, v in state.items() if k != name}
    broken["extra.weight"] = torch.zeros(2)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(WeightsError) as info:
        load_backbone(SMALL, weights=str(path))
    msg = str(info.value)
    assert str(path) in msg and "missing keys" in msg and name in msg
    assert "unexpected keys" in msg and "extra.weight" in msg


def test_a_checkpoint_of_another_model_does_not_load(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit model 'test_resnet'"):
        load_backbone(SMALL, weights=str(path))


def test_shape_mismatch_is_reported(tmp_path, reference):
    _, state = reference
    other = timm.create_model(SMALL, pretrained=False, num_classes=7).state_dict()
    path = tmp_path / "seven.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_backbone(SMALL, weights=str(path))


def test_unreadable_weight_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone(SMALL, weights=str(tmp_path / "none.safetensors"))
    bad = tmp_path / "w.ckpt"
    bad.write_bytes(b"x")
    with pytest.raises(WeightsError, match="suffix"):
        read_state_dict(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(WeightsError, match="cannot read"):
        read_state_dict(junk)


class Payload:
    """An arbitrary class: loading it back would need unpickling code, which weights_only refuses."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Payload()}, path)
    with pytest.raises(WeightsError, match=r"cannot read.*a pickled Python object \(.*Payload\)") as info:
        read_state_dict(path)
    for advice in ("weights_only=False", "weights_only` set to `False", "can still be loaded", "safe_globals"):
        assert advice not in str(info.value)  # torch's advice to unpickle never reaches the user
    assert "torch.save(model.state_dict(), PATH)" in str(info.value)


def test_random_weights_are_a_function_of_the_seed():
    a, b, c = (load_backbone(SMALL, weights="random", seed=s) for s in (3, 3, 4))
    assert a.info["weights_seed"] == 3 and a.info["weights_sha256"] == b.info["weights_sha256"]
    assert c.info["weights_sha256"] != a.info["weights_sha256"]
    x = _batch(a)
    torch.testing.assert_close(a.features(x), b.features(x), rtol=0, atol=0)
    state = torch.random.get_rng_state()
    load_backbone(SMALL, weights="random", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left as it was


def test_hub_failure_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as info:
        load_backbone(SMALL, weights="hub")
    msg = str(info.value)
    assert "could not get the pretrained weights" in msg and SMALL in msg
    assert "--weights /path/to/model.safetensors" in msg and ".pth" in msg


def test_unknown_model_name():
    with pytest.raises(ValueError, match="timm has no model"):
        load_backbone("resnet_that_does_not_exist", weights="random")
    with pytest.raises(ValueError, match="--output"):
        load_backbone(SMALL, weights="random", output="logits")


def test_output_kinds_and_normalisation():
    pre = load_backbone("test_vit", weights="random")
    torch.manual_seed(0)
    head = load_backbone("test_vit", weights="random", output="head", normalize=True)
    head.model.load_state_dict(pre.model.state_dict())
    assert pre.info["output_kind"] == "pre_logits" and pre.d == pre.model.num_features == 64
    assert head.info["output_kind"] == "head" and head.d == 1000 and head.info["normalize"] is True
    x = _batch(pre)
    z_pre, z_head = pre.features(x), head.features(x)
    with torch.no_grad():
        logits = pre.model(x)
    torch.testing.assert_close(z_head, torch.nn.functional.normalize(logits, dim=1))
    torch.testing.assert_close(z_head.norm(dim=1), torch.ones(3))
    assert not torch.allclose(z_pre.norm(dim=1), torch.ones(3))


def test_image_text_models_default_to_their_normalised_projection():
    b = load_backbone("vit_xsmall_patch16_clip_224.tinyclip_yfcc15m", weights="random")
    assert b.info["embedding_head"] and b.info["output_kind"] == "head" and b.info["normalize"] is True
    assert b.d == 512
    z = b.features(_batch(b, 2))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


@pytest.mark.slow
def test_the_papers_clip_backbone_configuration():
    b = load_backbone("vit_base_patch16_clip_224.openai", weights="random")
    assert b.info["output_kind"] == "head" and b.info["normalize"] is True and b.d == 512
    pre = b.info["preprocessing"]
    assert pre["input_size"] == [3, 224, 224] and pre["interpolation"] == "bicubic" and pre["crop_pct"] == 0.9
    assert pre["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    forced = load_backbone("vit_base_patch16_clip_224.openai", weights="random", output="pre_logits", normalize=False)
    assert forced.d == 768 and forced.info["normalize"] is False


@pytest.mark.parametrize(
    "name,expected",
    [
        ("vit_base_patch16_clip_224.openai", True),
        ("vit_base_patch16_clip_224.laion2b", True),
        ("eva02_base_patch16_clip_224.merged2b", True),
        ("vit_base_patch16_siglip_224.webli", True),
        ("convnext_base.clip_laion2b", True),
        ("vit_base_patch16_clip_224.openai_ft_in12k_in1k", False),
        ("convnext_base.clip_laion2b_augreg_ft_in12k_in1k", False),
        ("resnet50.a1_in1k", False),
        ("convnext_tiny", False),
    ],
)
def test_embedding_head_detection(name, expected):
    assert is_embedding_head(name) is expected


def test_digits_cnn_has_no_hub_weights():
    with pytest.raises(WeightsError, match="train_backbone.py"):
        load_backbone("digits-cnn", weights="hub")
    b = load_backbone("digits-cnn", weights="random")
    assert b.info["weights_source"] == "random" and b.info["output_kind"] == "pre_logits" and b.d == 200


def test_hub_weights_come_from_the_local_cache_offline(tmp_path, monkeypatch, reference):
    model, state = reference
    # The layout huggingface_hub gives its cache: a snapshot per commit and a ref naming it.
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    weights = repo / "snapshots" / commit / "model.safetensors"
    weights.parent.mkdir(parents=True)
    save_file(state, str(weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    b = load_backbone(SMALL, weights="hub")
    assert b.info["weights_source"] == "hub:timm/test_resnet.r160_in1k"
    assert b.info["weights_sha256"] == sha256_file(weights)
    x = _batch(b)
    torch.testing.assert_close(b.features(x), _pre_logits(model, x), rtol=0, atol=0)
