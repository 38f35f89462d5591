"""An application of model artifacts deployed by jobs.serve on the session's Serve, for one test module."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def deployed(root: str, name: str, ports: dict[str, int], key: str, models: str) -> Iterator[tuple[str, object]]:
    """(base URL, config) of application `name` serving `models` (a YAML list) from storage `root`,
    with API key `key`, on the session's ports; deleted when the block ends."""
    from ray import serve

    from cluster.config import load_config
    from jobs import serve as serve_job

    cfg = load_config(serve_job.ServeConfig, None, [
        f"storage={root}", f"name={name}", f"http.port={ports['http']}", f"grpc.port={ports['grpc']}",
        f"api_keys=[{key}]", f"models={models}"])
    url = serve_job.deploy(cfg)
    try:
        yield url, cfg
    finally:
        serve.delete(cfg.name)
