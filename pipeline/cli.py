"""`mixer`: the one entry point. Each group of commands lives in pipeline/commands/ and registers its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import MixerError

# Module names, in the order their commands appear in `mixer --help`.
COMMAND_GROUPS = ("models", "data", "train", "checkpoints", "jobs", "plan", "plot", "quickstart")

EPILOG = """\
the three journeys:
  prepare   mixer make-sample-data raw/ --layout imagefolder --classes 10 --per-class 50
            mixer prepare raw/ s3://bucket/ds --shard-size 1000 && mixer verify s3://bucket/ds
  train     mixer train jobs/quickstart.yaml --set run.url=out/run     (resumes automatically)
  submit    mixer submit jobs/mixer_b16_i21k.yaml --address http://127.0.0.1:8265   (via `ray dashboard` or https)

run `mixer COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixer",
        description="Pretrain MLP-Mixer at scale: prepare sharded datasets, train with DeepSpeed ZeRO on Ray, "
        "keep checkpoints on object storage, resume anywhere.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_GROUPS:
        importlib.import_module(f"pipeline.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MixerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # a path the user gave that is not there
        print(f"error: {e.filename or e}: no such file or object", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
