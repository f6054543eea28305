"""The `ember` command: parses arguments and hands off to one subcommand, loaded lazily."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from ember.server.settings import add_serve_arguments

    parser = argparse.ArgumentParser(prog="ember", description="Ember model server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model repository (KServe V1, V2 REST)")
    add_serve_arguments(serve)
    bench = sub.add_parser("bench", help="closed-loop load against a V2 endpoint")
    from ember.server.bench.cli import add_bench_arguments

    add_bench_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from ember.server.serve import run
        from ember.server.settings import settings_from

        return run(settings_from(args))
    if args.command == "bench":
        from ember.server.bench.cli import run_bench

        return run_bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
