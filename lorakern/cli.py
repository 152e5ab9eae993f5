"""Command line: ``python -m lorakern env``."""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakern", description="lorakern command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, CPU features and available backends")
    args = parser.parse_args(argv)
    if args.command == "env":
        from .env import main as env_main

        return env_main()
    return 2
