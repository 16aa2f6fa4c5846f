"""The ffcv loader: rank split, exact evaluation coverage, resume, output format."""
import numpy as np
import pytest
import torch

from cvtkit.prep.beton import ShardIndex, write_beton
from cvtkit.data.ffcv_loader import FfcvLoader, rank_indices
from cvtkit.prep.pipeline import PrepOptions, run

import fake_imagenet as fake


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv")
    src = fake.make_imagenet1k(root / "in1k")
    run(PrepOptions(source=str(src), out=str(root / "wds"), shard_samples=16, workers=1), progress=False)
    for split in ("train", "validation"):
        write_beton(root / "wds", split, root / f"{split}.beton", max_resolution=64, workers=1)
    return root


def test_rank_indices_split_and_cover():
    train = [rank_indices(40, r, 3, 4, seed=0, epoch=0, train=True) for r in range(3)]
    assert all(len(t) == 12 for t in train)  # 40 // (3 * 4) = 3 batches of 4 per rank
    flat = np.concatenate(train)
    assert len(set(flat.tolist())) == 36
    assert not np.array_equal(rank_indices(40, 0, 3, 4, 0, 1, True), train[0])
    assert np.array_equal(rank_indices(40, 1, 3, 4, 0, 0, True, skip_batches=2), train[1][8:])
    val = np.concatenate([rank_indices(10, r, 3, 4, 0, 0, False) for r in range(3)])
    assert sorted(val.tolist()) == list(range(10))


def test_eval_loader_covers_each_sample_once_across_ranks(betons):
    labels = []
    for rank in range(3):
        loader = FfcvLoader(str(betons / "validation.beton"), 4, 32, rank, 3, workers=1, train=False)
        for images, y in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            labels += y.tolist()
    expected = [s.label for s in ShardIndex(betons / "wds", "validation").samples]
    assert sorted(labels) == sorted(expected) and len(labels) == 12


def test_train_loader_equal_batches_and_resume(betons):
    def make(rank=0, world=2):
        return FfcvLoader(str(betons / "train.beton"), 4, 32, rank, world, workers=1, seed=5)
    counts = {len(list(make(r))) for r in range(2)}
    assert counts == {40 // 8} and len(make()) == 5
    reference = [y.tolist() for _, y in make()]
    first = make()
    it = iter(first)
    head = [next(it)[1].tolist() for _ in range(2)]
    state = first.state_dict()
    assert state["batches_done"] == 2
    second = make()
    second.load_state_dict(state)
    tail = [y.tolist() for _, y in second]
    assert head + tail == reference


def test_square_warp_is_refused_with_a_reason(betons):
    from cvtkit.models.factory import SQUASH_384
    loader = FfcvLoader(str(betons / "validation.beton"), 4, 384, train=False, eval_cfg=SQUASH_384)
    with pytest.raises(ValueError, match="no square-warp decoder"):
        next(iter(loader))


def test_one_ffcv_loader_per_run_and_the_trainers_threads_kept(betons, monkeypatch):
    """ffcv's Loader (and its compiled pipeline) is built once, not per epoch; each epoch still
    has its own order; ffcv's resetting of PyTorch's thread count does not reach the trainer."""
    from ffcv.loader import Loader
    built = []
    original = Loader.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)
    monkeypatch.setattr(Loader, "__init__", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = FfcvLoader(str(betons / "train.beton"), 4, 32, 0, 2, workers=2, seed=5)
        epochs = []
        for _ in range(3):
            epochs.append([y.tolist() for _, y in loader])
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert len(built) == 1 and loader.epoch == 3
    assert all(len(e) == 5 for e in epochs) and epochs[0] != epochs[1]


def test_another_world_size_is_refused_with_the_reason(betons):
    """ffcv's order is dealt by rank: a position from 2 ranks is refused on 1, not continued in
    another order."""
    from cvtkit.data.position import LoaderStateError
    state = FfcvLoader(str(betons / "train.beton"), 4, 32, 0, 2, workers=1, seed=5).state_dict()
    with pytest.raises(LoaderStateError, match="FfcvLoader deals each epoch's samples by rank, so a position "
                                               "saved on 2 ranks x micro batch 4 continues in the same order "
                                               "only there"):
        FfcvLoader(str(betons / "train.beton"), 4, 32, 0, 1, workers=1, seed=5).load_state_dict(state)
