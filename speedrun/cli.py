"""The `speedrun` command. Each subcommand lives in the module that does the work and adds itself
here through a `register(subparsers)` function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from speedrun.errors import SpeedrunError

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = [
    "speedrun.train",
    "speedrun.data.cli",
    "speedrun.bench",
    "speedrun.schedule",
    "speedrun.doctor",
    "speedrun.analysis",
    "speedrun.ablate",
    "speedrun.sample",
    "speedrun.evaluate",
    "speedrun.export",
]


def _cmd_presets(args: argparse.Namespace) -> int:
    from speedrun.config import preset_description, preset_names

    names = preset_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {preset_description(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speedrun", description="Train GPT language models as fast as the hardware allows.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.import_module('speedrun').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    sub.add_parser("presets", help="list the shipped presets").set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    from speedrun.distributed import use_expandable_segments
    from speedrun.prepare import use_persistent_compile_cache

    use_expandable_segments()  # before anything touches CUDA
    use_persistent_compile_cache()  # before torch._dynamo is imported (see there)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SpeedrunError as e:
        print(f"speedrun {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"speedrun {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        # point stdout at /dev/null so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
