"""Command line: ``python -m fastattr info``, ``demo`` and ``attribute-many``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattr")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the version, the build and the available backends")
    demo = sub.add_parser("demo", help="end-to-end demo on a bundled synthetic model")
    demo.add_argument("--size", choices=["small", "medium"], default="small")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    from fastattr import attribute_many

    attribute_many.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "attribute-many":
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return attribute_many.run(args)

    if args.command == "info":
        from fastattr import info

        info()
        return 0
    from fastattr.demo import run_demo

    return run_demo(size=args.size, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
