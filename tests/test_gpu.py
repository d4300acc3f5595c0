"""CUDA paths: the SAE's sparse step and training, and extraction, agree with their CPU runs.

Marked ``gpu``: deselected by default, skipped without CUDA (``python -m pytest -m gpu``).
"""

import numpy as np
import pytest
import torch

from sae.checkpoint import load_sae
from sae.config import SAEConfig
from sae.model import TopKSAE
from sae.reference import DenseTopKSAE
from sae.train import RunConfig, TrainConfig, train_sae

pytestmark = pytest.mark.gpu


def _step(model, x, dead_mask):
    model.zero_grad(set_to_none=True)
    out = model(x, dead_mask=dead_mask)
    out.loss.backward()
    return out, {name: p.grad.detach().cpu() for name, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["topk", "paper"])
def test_sparse_step_on_cuda_equals_the_dense_twin_on_cpu(variant):
    config = SAEConfig(64, 512, 8) if variant == "topk" else SAEConfig.paper(64, 512, 8)
    torch.manual_seed(0)
    fast = TopKSAE(config).double()
    dense = DenseTopKSAE(config).double()
    dense.load_state_dict(fast.state_dict())
    fast.cuda()
    if variant == "paper":  # dropout masks differ between devices
        fast.eval()
        dense.eval()
    x = torch.randn(256, 64, dtype=torch.float64)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::7] = True
    out_fast, grads_fast = _step(fast, x.cuda(), dead.cuda())
    out_dense, grads_dense = _step(dense, x, dead)
    torch.testing.assert_close(out_fast.recon.cpu(), out_dense.recon, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out_fast.loss.cpu(), out_dense.loss, rtol=1e-9, atol=1e-9)
    for name in grads_dense:
        torch.testing.assert_close(grads_fast[name], grads_dense[name], rtol=1e-7, atol=1e-9, msg=name)


def test_training_on_cuda_matches_cpu_and_loads_anywhere(tmp_path):
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((96, 32)).astype(np.float32)
    codes = rng.random((4096, 96)) * (rng.random((4096, 96)) < 0.05)
    x = (codes @ atoms).astype(np.float32)
    sae_config = SAEConfig(32, 128, 4)
    config = TrainConfig(batch_size=512, n_steps=150, seed=3)
    results = {}
    for device in ("cpu", "cuda"):
        run = RunConfig(device=device, progress=False, checkpoint_every=0)
        results[device] = train_sae(x, tmp_path / device, sae_config, config, run,
                                    train_rows=np.arange(3584), heldout_rows=np.arange(3584, 4096))
    fvu_cpu, fvu_cuda = (results[d].metrics["heldout"]["fvu"] for d in ("cpu", "cuda"))
    assert np.isfinite(fvu_cuda) and fvu_cuda < 0.8  # 0.55 on CPU
    assert abs(fvu_cuda - fvu_cpu) < 0.05, (fvu_cpu, fvu_cuda)  # same seed, same data order, other kernels
    model = load_sae(tmp_path / "cuda", device="cpu")
    values, indices = model.encode(torch.tensor(x[:16]))
    assert values.shape == indices.shape == (16, 4)


def test_bf16_autocast_step_on_cuda_is_close_to_fp32():
    torch.manual_seed(0)
    model = TopKSAE(SAEConfig(512, 4096, 16)).cuda()
    x = torch.randn(1024, 512, device="cuda")
    out32 = model(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16 = model(x)
    assert torch.isfinite(out16.loss)
    assert abs(out16.loss.float().item() - out32.loss.item()) < 0.05 * out32.loss.item()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_extraction_on_cuda_matches_cpu(tmp_path, num_workers):
    """Uint8 batches go to the GPU (pinned), are normalised there, and give the CPU run's embeddings."""
    from PIL import Image

    from embeddings.extract import ExtractConfig, ExtractRun, extract

    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (48 + i, 64, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    cfg = ExtractConfig(source=str(root), backbone="test_resnet", weights="random", batch_size=4)
    stores = {}
    for device in ("cpu", "cuda"):
        run = ExtractRun(out_dir=tmp_path / device, device=device, num_workers=num_workers, chunk_size=8,
                         progress=False)
        stores[device] = extract(cfg, run)
    assert stores["cuda"].ids == stores["cpu"].ids and len(stores["cuda"].skipped) == 1
    assert stores["cuda"].meta["device"].startswith("cuda")
    a, b = np.asarray(stores["cuda"].x, dtype=np.float64), np.asarray(stores["cpu"].x, dtype=np.float64)
    # cuDNN may run convolutions in TF32: compare directions and norms, not bits
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.999, cos
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1), rtol=1e-2)
