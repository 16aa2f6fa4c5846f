"""Evaluate any checkpoint: top-1 / top-5 (%) and cross-entropy with the official transform of the
model's evaluation metadata at the chosen resolution (docs/evaluation.md), on webdataset shards, a
`.beton` file or an image folder, on one rank or many. By default a training run is scored in its
`engine.precision` (as its validation during training was), any other checkpoint in fp32.

    python finetune/evaluate.py --checkpoint runs/cvt_w24_384_ft1k --data /data/in1k-wds --res 384
    torchrun --nproc-per-node 8 finetune/evaluate.py --checkpoint exports/w24 --data /data/imagenet/val

Labels follow the model's classes: when the checkpoint lists its synsets (runs, exports) and the
data lists its own (shards' `_info.json`, timm's lists for the hub's shards, folder names), labels
are mapped by synset, so a 22k model can be scored on 1k data or on the hub's `validation_12k`. Every rank reads the checkpoint; for a large DeepSpeed run,
export it first (finetune/export.py) so that nothing is consolidated per rank.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cvtkit.data.eval_sets import EvalDataError, folder_eval_loader
from cvtkit.data.config import eval_loader_beton, eval_loader_wds
from cvtkit.shards import ShardInfo, folder_synsets, has_info
from cvtkit.device import DTYPES, backend_for, local_device
from cvtkit.dist import discover
from cvtkit.errors import CvtkitError
from cvtkit.models.factory import EvalConfig, eval_config
from cvtkit.models.weights import Checkpoint, checkpoint_classes, model_from_checkpoint
from cvtkit.train.validation import validate


def run_precision(ckpt: Checkpoint) -> str:
    """`auto`: a training run is scored in the precision its validation ran in (engine.precision,
    from the checkpoint's metadata), so that both give the same figures for the same checkpoint;
    anything else in fp32, as the official code evaluates."""
    return ckpt.metadata.get("precision") or "fp32"


def trained_res(ckpt: Checkpoint) -> int | None:
    """The resolution a run validated at (its checkpoint's `eval_res`, from `DataConfig.eval_size`),
    or an export's `res`."""
    return ckpt.metadata.get("eval_res") or ckpt.metadata.get("res")


def data_kind(path: str) -> str:
    p = Path(path)
    if p.is_file() and p.suffix == ".beton":
        return "ffcv"
    if "://" in path or (p.is_dir() and has_info(p)):
        return "wds"
    if p.is_dir():
        return "folder"
    raise EvalDataError(f"--data {path}: not a .beton file, a shard folder with _info.json (or timm's "
                        f"info.json), or an image folder of class folders")


def _label_map(data_classes: list[str] | None, model_classes: list[str] | None, where: str):
    """A lookup tensor data label -> model label, or None when they are the same (or unknown)."""
    if data_classes is None or model_classes is None or data_classes == model_classes:
        return None
    index = {s: i for i, s in enumerate(model_classes)}
    unknown = [s for s in data_classes if s not in index]
    if unknown:
        raise EvalDataError(f"{where}: classes the model has no row for: {', '.join(unknown[:5])}"
                         + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    return torch.tensor([index[s] for s in data_classes])


def _remapped(loader, lut):
    for images, labels, *_ in loader:
        yield images, lut[labels]


def build_loader(path: str, split: str, eval_cfg: EvalConfig, batch: int, rank: int, world: int,
                 workers: int, model_classes: list[str] | None):
    kind = data_kind(path)
    if kind == "folder":
        return folder_eval_loader(path, eval_cfg, batch, rank, world, workers, classes=model_classes)
    if kind == "wds":
        info = ShardInfo.read(path)
        data_classes = info.split(split).synsets  # an alt-label split's own (timm's validation_12k)
        loader = eval_loader_wds(info, split, eval_cfg, batch, rank, world, workers)
    else:
        data_classes = folder_synsets(str(Path(path).parent))
        loader = eval_loader_beton(path, eval_cfg, batch, rank, world, workers)
    lut = _label_map(data_classes, model_classes, path)
    return loader if lut is None else _remapped(loader, lut)


def evaluate_checkpoint(checkpoint: str, data: str, res: int | None = None, split: str = "validation",
                        model_name: str | None = None, use_ema: bool = False, batch: int = 64,
                        workers: int = 4, precision: str = "auto") -> dict:
    """Evaluate on this process's share (all of it without a process group); returns the
    metrics summed over ranks, with what was evaluated."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = local_device(discover().local_rank)
    model, ckpt = model_from_checkpoint(checkpoint, model_name, use_ema)
    res = res or trained_res(ckpt) or model.default_res
    cfg = eval_config(model, res)
    precision = run_precision(ckpt) if precision == "auto" else precision
    dtype = DTYPES[precision]
    model.to(device).eval()
    for p in model.parameters():  # as DeepSpeed: parameters in `dtype`, BN statistics stay fp32
        p.data = p.data.to(dtype)
    loader = build_loader(data, split, cfg, batch, rank, world, workers, checkpoint_classes(ckpt))
    metrics = validate(model, loader, device, dtype, input_size=cfg.input_size)
    return {**metrics, "checkpoint": str(ckpt.path), "model": model.model_name, "data": data,
            "res": res, "crop_mode": cfg.crop_mode, "crop_pct": cfg.crop_pct, "precision": precision,
            "use_ema": use_ema, "world_size": world}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run folder or checkpoint (any ZeRO stage), export, official or HF file")
    parser.add_argument("--data", required=True,
                        help="shard folder (_info.json or timm's info.json), .beton file or image folder")
    parser.add_argument("--res", type=int, help="input size (default: the run's evaluation size)")
    parser.add_argument("--split", default="validation", help="shard split (default: validation)")
    parser.add_argument("--model", help="model name, for checkpoints that do not record it")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--workers", type=int, default=4, help="loader workers per rank")
    parser.add_argument("--precision", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="auto (default): a training run's engine.precision, else fp32")
    parser.add_argument("--out", "--json", dest="out", help="write the metrics to this JSON file")
    args = parser.parse_args(argv)

    env = discover()
    if env.world_size > 1:
        env.export()
        device = local_device(env.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(minutes=30))
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.res, args.split, args.model,
                                     args.ema, args.batch, args.workers, args.precision)
    except CvtkitError as e:
        print(f"error: {e.one_line()}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if env.rank == 0:
        print(f"{result['model']} at {result['res']} ({result['crop_mode']}, crop {result['crop_pct']}, "
              f"{result['precision']}): top-1 {result['top1']:.3f} top-5 {result['top5']:.3f} "
              f"loss {result['loss']:.4f} ({int(result['count'])} images, {result['world_size']} ranks)",
              flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0
