"""Command line: ``python -m fastattr info``, ``demo``, ``selftest`` and ``attribute-many``."""

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
    _add_selftest(sub)
    from fastattr import attribute_many

    attribute_many.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "attribute-many":
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return attribute_many.run(args)

    if args.command == "selftest":
        return _run_selftest(args)

    if args.command == "info":
        from fastattr import info

        info()
        return 0
    from fastattr.demo import run_demo

    return run_demo(size=args.size, device=args.device)


def _add_selftest(sub) -> None:
    st = sub.add_parser("selftest", help="every op on every available backend against the reference; "
                                         "exit 1 on any mismatch")
    st.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON to PATH")
    st.add_argument("--backend", action="append", default=None, help="only this backend (repeatable)")
    st.add_argument("--op", action="append", default=None, help="only this op (repeatable)")


def _run_selftest(args) -> int:
    from fastattr.selftest import selftest

    report = selftest(backends=args.backend, ops=args.op, json_path=args.json)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
