"""The model zoo at a glance: parameters and multiply-accumulates per variant and resolution.

    python -m cvtkit.models.summary [--models 'cvt*'] [--res 224 384]

MACs are counted by running the model on the meta device (no memory, no compute) under
`torch.utils.flop_counter`, with the einsum attention so the attention matmuls show up as `bmm`.
"Total" is conv + linear + attention matmuls (the CvT paper's convention: CvT-13 4.58 G at 224);
"conv+linear" leaves the attention matmuls out (the CeiT paper's convention: CeiT-T 1.2 G).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .factory import create_model, get_entry, list_models


@dataclass(frozen=True)
class MacCount:
    total: float  # conv + linear + attention matmuls, per image
    attention: float  # q @ k^T and attn @ v

    @property
    def conv_linear(self) -> float:
        return self.total - self.attention


def model_macs(name: str, res: int, **overrides) -> MacCount:
    """MACs per image of one forward pass of `name` at `res x res`, counted on the meta device."""
    with torch.device("meta"):
        model = create_model(name, attn_impl="reference", **overrides).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, 3, res, res))
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # A flop here is a multiply or an add: MACs = flops / 2.
    return MacCount(total=sum(flops.values()) / 2, attention=flops.get("aten.bmm", 0) / 2)


def param_count(name: str, **overrides) -> int:
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def zoo_rows(pattern: str = "*", resolutions: tuple[int, ...] = (224, 384)) -> list[dict]:
    rows = []
    for name in list_models(pattern):
        entry = get_entry(name)
        res_list = [entry.default_res] if entry.fixed_res else list(resolutions)
        params = param_count(name)
        for res in res_list:
            macs = model_macs(name, res)
            rows.append(dict(model=name, res=res, params=params, macs=macs))
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'model':<16}{'res':>5}{'params':>15}{'GMACs total':>13}{'GMACs conv+linear':>19}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<16}{r['res']:>5}{r['params']:>15,}"
                     f"{r['macs'].total / 1e9:>13.3f}{r['macs'].conv_linear / 1e9:>19.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="*", help="glob over model names, e.g. 'cvt*'")
    parser.add_argument("--res", type=int, nargs="+", default=[224, 384],
                        help="resolutions for the resolution-free models (CvT)")
    args = parser.parse_args(argv)
    rows = zoo_rows(args.models, tuple(args.res))
    if not rows:
        parser.error(f"no model matches {args.models!r} (available: {', '.join(list_models())})")
    print(format_table(rows))


if __name__ == "__main__":
    main()
