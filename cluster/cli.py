"""The shape every job's entry point shares: parse, load config, connect, run.

`python -m jobs.<name> CONFIG.yaml [--set key=value ...]`; a user's mistake
(bad config, missing input, wrong artifact) ends with one sentence on stderr
and exit code 2, never a traceback from inside a library.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, TypeVar

from cluster.config import ConfigError, load_config
from cluster.storage import ArtifactError

T = TypeVar("T")


class UserError(RuntimeError):
    """A mistake in what the user asked for (input missing, nothing to do, ...)."""


def format_summary(title: str, rows: list[tuple[str, str]]) -> str:
    """The two-column block a job prints when it is done."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", title, "-" * (width + 20)] + [f"{k:<{width}}  {v}" for k, v in rows])


class JobFailed(RuntimeError):
    """The job ran and failed (a worker crashed past its retries, ...): exit 1, one sentence."""


USER_ERRORS = (ConfigError, ArtifactError, UserError)


def run_job(
    prog: str,
    doc: str | None,
    config_cls: type[T],
    run: Callable[[T], Any],
    argv: list[str] | None,
) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=(doc or "").strip().splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config (omitted: all defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set storage=/tmp/runs (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s helio %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
        run(cfg)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
