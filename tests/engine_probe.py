"""One rank of a real DeepSpeed engine built from a run config, probed for what the many-rank tests
check (run by tests/test_engine_numerics.py as N processes over gloo):

    python tests/engine_probe.py OUT.json --config tiny_cpu.yaml --set ...

It builds the engine exactly as the trainer does (cvtkit.train.engine), takes one optimizer step of
`accumulation` micro-batches of synthetic data (each rank its own), and writes per rank:
- the engine's effective dtypes (model, gradient accumulation, communication);
- `update_error`: max |(fp32 master before - after) / lr - g| over every parameter, where g is the
  gradient averaged over ranks and micro-batches *computed in fp32* from the bf16 gradients of a
  plain-autograd copy of the same bf16 model (plain SGD, lr 1, no momentum or weight decay, no
  clipping: the update is exactly the averaged gradient), and `update_scale`: max |g|;
- after `--ema-steps` more steps with an EMA, `ema_error`: max |EMA - an EMA computed on the side
  from the fp32 masters gathered after every step|.
"""
import copy
import json
import sys

import torch
import torch.distributed as dist

from cvtkit.config_loader import add_config_args, load_config
from cvtkit.dist import discover
from cvtkit.models.factory import build_model
from cvtkit.train.engine import batch_plan, build_optimizer, deepspeed_config, init_distributed
from cvtkit.train.loss import classification_loss
from cvtkit.train.run_config import RunConfig
from cvtkit.train.state import MasterEma, full_fp32_params


def micro_batches(cfg: RunConfig, rank: int, micro: int, count: int, seed: int):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    res, classes = cfg.data.res, cfg.model.num_classes
    return [(torch.randn(micro, 3, res, res, generator=g), torch.randint(0, classes, (micro,), generator=g))
            for _ in range(count)]


def update_check(cfg: RunConfig, engine, rank: int, world: int, micro: int, accum: int, dtype) -> dict:
    """One optimizer step against the gradient each micro-batch gives in bf16 (plain autograd on a
    copy of the module), averaged over ranks and micro-batches in fp32."""
    batches = micro_batches(cfg, rank, micro, accum, seed=0)
    reference = copy.deepcopy(engine.module)
    expected = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in reference.named_parameters()}
    for x, y in batches:
        reference.zero_grad()
        classification_loss(reference(x.to(dtype)), y).backward()
        for n, p in reference.named_parameters():
            expected[n] += p.grad.float()
    for g in expected.values():
        dist.all_reduce(g)
        g /= world * accum
    before = full_fp32_params(engine.module)
    for x, y in batches:
        engine.backward(classification_loss(engine(x.to(dtype)), y))
        engine.step()
    after = full_fp32_params(engine.module)
    lr = cfg.optim.lr
    return {"update_error": max(((before[n] - after[n]) / lr - expected[n]).abs().max().item() for n in expected),
            "update_scale": max(g.abs().max().item() for g in expected.values())}


def main(out: str, argv: list[str]) -> None:
    import argparse

    import deepspeed
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    parser.add_argument("--ema-steps", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config(RunConfig, args.config, args.overrides)
    device, rank, world = init_distributed(discover(), 120)
    micro, accum = batch_plan(cfg, world)
    torch.manual_seed(cfg.engine.seed)
    model = build_model(cfg.model)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg, device),
                                                   config=deepspeed_config(cfg, micro, accum, universal=False))
    dtype = next(engine.module.parameters()).dtype
    result = {"model_dtype": str(engine.get_data_types()[0]), "grad_accum_dtype": str(engine.get_data_types()[1]),
              "communication_dtype": str(engine.communication_data_type), "optimizer": type(engine.optimizer).__name__,
              "micro": micro, "accumulation": accum}

    if cfg.engine.zero_stage < 3:  # ZeRO-3's module cannot be copied out of its partitioning hooks
        result.update(update_check(cfg, engine, rank, world, micro, accum, dtype))
    if args.ema_steps:
        decay = 0.5  # large steps, so that every update shows in the EMA
        ema = MasterEma(engine.module, decay)
        side = {n: p.clone() for n, p in full_fp32_params(engine.module).items()}
        for step in range(args.ema_steps):
            for x, y in micro_batches(cfg, rank, micro, accum, seed=step + 1):
                engine.backward(classification_loss(engine(x.to(dtype)), y))
                engine.step()
            ema.update(engine.module)
            for n, p in full_fp32_params(engine.module).items():
                side[n].lerp_(p, 1 - decay)
        gathered = ema.state_dict()
        result["ema_error"] = max((gathered[n] - side[n]).abs().max().item() for n in side)
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
