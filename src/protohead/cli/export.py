"""``protohead export RUN --format onnx|torchscript``: backbone + head of a trained run as one deployable file."""

from __future__ import annotations

import argparse
from pathlib import Path

from protohead.cli.common import guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help=__doc__.split(":", 1)[1].strip().rstrip("."))
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder written by protohead run/train")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                        help="onnx (run with onnxruntime) or torchscript (torch.jit.load); default onnx")
    parser.add_argument("--out", type=Path,
                        help="output file (default RUN/export/model.onnx or RUN/export/model.pt)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the traced example (default 1)")
    parser.set_defaults(handler=guarded(main))


def main(args: argparse.Namespace) -> int:
    from protohead import runfolder
    from protohead.export import DeployModel, export_model, prior_logit_shift, read_export_metadata
    from protohead.model import EndToEnd, head_of
    from protohead.pipeline import split_views
    from protohead.views import view_names

    loaded = runfolder.load_model(args.run_dir)
    backbone = runfolder.load_backbone(loaded)
    tau = loaded.posthoc_tau
    views = view_names(split_views(loaded.config, "test"))  # what predict averages over (views with tta)
    model = DeployModel(backbone, head_of(loaded.model),
                        logit_shift=prior_logit_shift(loaded.class_counts, tau) if tau else None,
                        round_features=not isinstance(loaded.model, EndToEnd), temperature=loaded.temperature,
                        views=views)
    suffix = ".onnx" if args.format == "onnx" else ".pt"
    out = args.out or args.run_dir / runfolder.EXPORT_DIR / f"model{suffix}"
    path = export_model(model, out, args.format, backbone.image_size, batch_size=args.batch_size,
                        metadata={"class_names": list(loaded.class_names), "posthoc_tau": tau,
                                  "calibration_temperature": loaded.temperature, "views": list(views),
                                  "preset": loaded.config.preset, "backbone": loaded.config.backbone,
                                  "pixel_mean": list(backbone.pixel_mean), "pixel_std": list(backbone.pixel_std)})
    checked = read_export_metadata(path).get("verified_max_abs_diff")
    print(f"exported {args.format}: {path} (input (B, 3, {backbone.image_size}, {backbone.image_size}) float32 "
          f"normalised as in training; output logits (B, {len(loaded.class_names)}) with the post-hoc shift τ = "
          f"{tau:g} and calibration temperature {loaded.temperature:.3f}; max |logit − PyTorch| on a check batch "
          f"{checked})")
    return 0
