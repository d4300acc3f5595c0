"""The backbone a store was extracted with, rebuilt from the store's record: random weights from the recorded seed,
the same embedding for the same image, and a refusal when the rebuilt weights are not the recorded ones."""

import numpy as np
import pytest
import torch
from PIL import Image

from artifacts import ArtifactError, read_json, write_json
from embeddings.extract import ExtractConfig, ExtractRun, extract
from embeddings.images import load_rgb
from embeddings.store import EmbeddingStore
from embeddings.store_backbone import load_store_backbone, weights_seed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store_backbone")
    root = tmp / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
    config = ExtractConfig(source=str(root), backbone="digits-cnn", weights="random", batch_size=2, seed=3)
    run = ExtractRun(out_dir=tmp / "store", device="cpu", num_workers=0, n_threads=1, chunk_size=2, progress=False)
    return extract(config, run), root


def _embed(backbone, path):
    with torch.no_grad():
        return backbone.features(backbone.transform(load_rgb(path))[None])[0].numpy()


def test_the_store_records_the_seed_of_its_random_weights(random_store):
    store, _ = random_store
    assert store.meta["weights_seed"] == 3 and store.meta["backbone_info"]["weights_seed"] == 3
    assert weights_seed(store) == 3


def test_the_rebuilt_backbone_embeds_an_image_as_the_store_did(random_store):
    store, root = random_store
    for _ in range(2):  # every rebuild is the same network, not a new draw
        backbone = load_store_backbone(store)
        for row, image_id in enumerate(store.ids):
            np.testing.assert_allclose(_embed(backbone, root / image_id), store.x[row], rtol=1e-5, atol=1e-6)


def test_a_store_from_before_the_seed_was_recorded_uses_its_config_seed(random_store, tmp_path):
    store, root = random_store
    meta = dict(store.meta)
    del meta["weights_seed"]
    meta["backbone_info"] = {k: v for k, v in meta["backbone_info"].items() if k != "weights_seed"}
    old = EmbeddingStore(**{**store.__dict__, "meta": meta})
    assert weights_seed(old) == 3
    np.testing.assert_allclose(_embed(load_store_backbone(old), root / store.ids[0]), store.x[0], rtol=1e-5, atol=1e-6)


def test_a_seed_that_does_not_rebuild_the_recorded_weights_is_refused(random_store, tmp_path):
    import shutil

    store, _ = random_store
    copy = tmp_path / "store"
    shutil.copytree(store.store_dir, copy)
    meta = read_json(copy / "meta.json")
    meta["weights_seed"] = 4
    write_json(copy / "meta.json", meta)
    with pytest.raises(ArtifactError, match=rf"the backbone rebuilt from {copy / 'meta.json'} \(digits-cnn, weights "
                                            r"random\) is not the one the store was extracted with"):
        load_store_backbone(EmbeddingStore.open(copy))


def test_a_store_without_a_backbone_record_is_refused(tmp_path):
    from embeddings.store import write_store

    store = write_store(tmp_path / "s", np.zeros((2, 3), np.float32))
    with pytest.raises(ArtifactError, match="does not record its backbone and weights"):
        load_store_backbone(store)
