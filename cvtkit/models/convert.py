"""Convert any supported checkpoint into a cvtkit export (safetensors + JSON), checked strictly.

    python -m cvtkit.models.convert CvT-13-224x224-IN-1k.pth out/cvt_13 --model cvt_13
    python -m cvtkit.models.convert hf/cvt-21-384-22k/ out/cvt_21_384 --model cvt_21
    python -m cvtkit.models.convert ceit_small.pth out/ceit_small --model ceit_small --ema

The weights are loaded into the named model first, so a file that does not fit fails here with
the mismatching keys named, not later in training.
"""
from __future__ import annotations

import argparse
import sys

from .factory import create_model, list_models
from .weights import CheckpointError, load_state_dict_checked, read_checkpoint, save_export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="official .pth, HuggingFace file or folder, or an export")
    parser.add_argument("out", help="output folder (model.safetensors + cvtkit.json)")
    parser.add_argument("--model", required=True, choices=list_models(), metavar="NAME",
                        help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--ema", action="store_true", help="take 'model_ema' from a CeiT checkpoint")
    args = parser.parse_args(argv)
    try:
        state = read_checkpoint(args.source, use_ema=args.ema)
        head = state.state_dict.get("head.weight")
        num_classes = head.shape[0] if head is not None else 0
        model = create_model(args.model, num_classes=num_classes)
        report = load_state_dict_checked(model, state.state_dict, source=str(state.path))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_export(model, args.out, extra={"converted_from": str(state.path),
                                              "source_format": state.source_format})
    notes = f" ({'; '.join(report.adapted)})" if report.adapted else ""
    print(f"{state.path} [{state.source_format}] -> {out} as {args.model}, "
          f"{num_classes} classes{notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
