"""Ranks and device resolution shared by the multi-process stages (the torchrun paths are tested end to end
in test_extract_processes.py and test_sae_ddp.py)."""

import pytest
import torch

from artifacts.ranks import Ranks, resolve_device, resolve_device_type


def test_one_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = Ranks.from_env("cpu")
    assert (ranks.rank, ranks.world_size, ranks.is_main, ranks.owns_group) == (0, 1, True, False)
    assert ranks.broadcast_int(7, torch.device("cpu")) == 7
    ranks.barrier()
    ranks.close()


def test_devices():
    one = Ranks()
    assert resolve_device("cpu", one) == torch.device("cpu")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device_type("auto") == auto
    assert resolve_device("auto", Ranks(local_rank=0)).type == auto
    if torch.cuda.is_available():
        assert resolve_device("cuda", Ranks(rank=1, world_size=2, local_rank=0)) == torch.device("cuda:0")
    else:
        with pytest.raises(ValueError, match="CUDA is not available here; use --device cpu"):
            resolve_device("cuda", one)
