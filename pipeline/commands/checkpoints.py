"""`mixer checkpoints list` and `mixer export`."""

from __future__ import annotations

import argparse
import sys

EXPORT_EPILOG = """\
examples:
  mixer export s3://bucket/run s3://bucket/run/exports/last.safetensors     # newest committed step
  mixer export s3://bucket/run/checkpoints/step-000001000 w.pth --format timm
  mixer export out/run mixer.npz --format npz                                # official Flax layout
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoints", help="list a run's committed checkpoints",
                       description="Inspect the checkpoints of a run (RUN/checkpoints/step-N/).")
    group = p.add_subparsers(dest="checkpoints_command", metavar="ACTION", required=True)
    ls = group.add_parser("list", help="committed steps: time, size, world size, ZeRO stage",
                          description="List the committed steps of a run, oldest first. A step counts once its "
                                      "manifest.json is written; a half-uploaded step is not shown.")
    ls.add_argument("run", help="run URL (or its checkpoints/ folder), local or s3://...")
    ls.add_argument("--verify", action="store_true",
                    help="re-read every file and check its sha256 against the manifest (exit status 1 on a mismatch)")
    ls.set_defaults(func=run_list)

    e = sub.add_parser("export", help="consolidate a checkpoint into plain fp32 weights",
                       description="Gather a checkpoint's ZeRO shards into the fp32 weights of the Mixer it trained "
                                   "and write them as safetensors, a timm state dict or an official .npz.",
                       epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("src", help="run URL (its newest committed step) or a step folder URL")
    e.add_argument("out", help="file or URL to write")
    e.add_argument("--format", choices=("safetensors", "timm", "npz"), default="safetensors",
                   help="safetensors (with the model config), timm (.pth state dict) or npz (official layout)")
    e.set_defaults(func=run_export)


def run_list(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import CheckpointStore
    from pipeline.units import format_size

    store = CheckpointStore(args.run)
    infos = store.list(verify=args.verify)
    if not infos:
        print(f"no committed checkpoints under {store.url}", file=sys.stderr)
        return 0
    print(f"{'step':>10}  {'time':<20}  {'size':>10}  {'world':>5}  {'zero':>4}  verified")
    for i in infos:
        verified = "-" if i.verified is None else "yes" if i.verified else "NO"
        print(f"{i.step:>10}  {i.time:<20}  {format_size(i.bytes):>10}  {i.world_size:>5}  {i.zero_stage:>4}  "
              f"{verified}")
    bad = [i.step for i in infos if i.verified is False]
    if bad:
        print(f"steps {bad} do not match their manifests: do not resume from them", file=sys.stderr)
        return 1
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pipeline.convert import export_weights

    print(export_weights(args.src, args.out, format=args.format))
    return 0
