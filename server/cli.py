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
    from ember.activator.settings import add_activator_arguments

    activator = sub.add_parser(
        "activator", help="queue-while-cold proxy and scaler in front of predictor replicas"
    )
    add_activator_arguments(activator)
    from ember.transformers.settings import add_transformer_arguments

    transformer = sub.add_parser(
        "transformer",
        help="run models' pre/post-processing and call a separate predictor (KServe transformer)",
    )
    add_transformer_arguments(transformer)
    bench = sub.add_parser("bench", help="closed-loop load against a V2 endpoint")
    from ember.server.bench.cli import add_bench_arguments

    add_bench_arguments(bench)
    from ember.server.storage.cli import add_cache_arguments, add_pull_arguments

    pull = sub.add_parser(
        "pull", help="fetch a model (s3://, https://) into the node cache or a folder"
    )
    add_pull_arguments(pull)
    cache = sub.add_parser("cache", help="list or prune the node cache")
    add_cache_arguments(cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from ember.server.coldstart import process_started

        started = process_started()
        from ember.server import prefetch
        from ember.server.settings import settings_from

        settings = settings_from(args)
        # Before the import of torch below: remote weights download while it runs.
        prefetched = prefetch.start(settings)
        from ember.server.serve import run

        return run(settings, started, prefetched)
    if args.command == "transformer":
        import dataclasses
        import os

        from ember.server.coldstart import process_started
        from ember.server.serve import run
        from ember.server.settings import settings_from
        from ember.transformers.settings import predictor_from

        started = process_started()
        try:
            predictor = predictor_from(args, dict(os.environ))
        except ValueError as exc:
            print(f"ember transformer: {exc}", file=sys.stderr)
            return 2
        settings = dataclasses.replace(settings_from(args), predictor=predictor)
        if settings.model_dir is None and settings.model_name and not settings.models:
            # KServe names the model; here it also picks the model's folder (for its
            # [pipeline]) out of the repository.
            settings = dataclasses.replace(settings, models=(settings.model_name,))
        return run(settings, started)
    if args.command == "activator":
        from ember.activator.settings import settings_from as activator_settings

        try:
            chosen = activator_settings(args)
        except ValueError as exc:
            print(f"ember activator: {exc}", file=sys.stderr)
            return 2
        from ember.activator.run import run as run_activator

        return run_activator(chosen)
    if args.command == "bench":
        from ember.server.bench.cli import run_bench

        return run_bench(args)
    if args.command == "pull":
        from ember.server.storage.cli import run_pull

        return run_pull(args)
    if args.command == "cache":
        from ember.server.storage.cli import run_cache

        return run_cache(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
