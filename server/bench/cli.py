"""PLACEHOLDER being replaced by the bench work."""

import argparse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run_bench(args: argparse.Namespace) -> int:
    raise SystemExit("not built yet")
