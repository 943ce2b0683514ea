"""The ``plora`` command line: ``plora train``, ``plora eval``, ``plora compare``.

Each sub-command lives in its own module exposing ``register(subparsers)``; this file only
dispatches and turns bad input (UserError, ValueError, TypeError, FileNotFoundError) into one
clear error line and exit code 2. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from plora.errors import UserError

_COMMAND_MODULES = ("plora.train", "plora.evaluate", "plora.compare")



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plora",
        description="Fine-tune, evaluate and compare LoRA, PeriodicLoRA (PLoRA) and full fine-tuning.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name == mod_name:  # command not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "accepts_overrides", False):
            args.overrides = extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
