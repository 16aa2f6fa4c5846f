"""The models under real DeepSpeed (ZeRO-2, bf16, two gloo processes on CPU)."""
import pytest
import torch
import torch.multiprocessing as mp

from cvtkit.dist import hosted_rendezvous
from helpers import TINY_CEIT, TINY_CVT


def _train(rank, world, rendezvous, name, extra, res, results):
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), **rendezvous)
    import deepspeed

    from cvtkit.models import create_model, weight_decay_groups
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **extra)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "gradient_clipping": 1.0}
    # torch's AdamW, as the trainer passes it (cvtkit.train.engine.build_optimizer): DeepSpeed's own
    # "AdamW" would compile its CPU Adam extension first (about a minute on 2 cores)
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(4, 3, res, res, generator=g).bfloat16()
    y = torch.randint(0, 4, (4,), generator=g)
    losses = []
    for _ in range(10):  # the same batch again and again: its loss must fall
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    results[rank] = losses


@pytest.mark.slow
@pytest.mark.parametrize("name,extra,res", [("cvt_13", TINY_CVT, 32), ("ceit_tiny", TINY_CEIT, 32)])
def test_zero2_bf16_two_processes(name, extra, res):
    results = mp.Manager().dict()
    store, rendezvous = hosted_rendezvous()  # held by this process while the ranks run
    mp.spawn(_train, args=(2, rendezvous, name, extra, res, results), nprocs=2)
    del store  # served the ranks' rendezvous until here
    for losses in results.values():
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0]
