"""The endpoints of a pipeline's served application, and one request to each of its models, sent over
HTTP from the client's side (make demo runs it once the pipeline job has ended and the app is up).

    python -m jobs.query jobs/configs/demo.yaml [--set storage=DIR]

Reads the pipeline config's serve section (it needs no Ray, and checks no other section): the HTTP
and gRPC addresses, then a completion, an embedding or a classification per model and a gRPC health
check, as `curl` or an OpenAI client would send them.
"""

from __future__ import annotations

import sys
import urllib.error

from actors.serve_app import ServeConfig, app_url
from actors.serve_client import samples
from cluster.cli import UserError, format_summary, run_job
from cluster.pipeline_config import PipelineSections, build, section


def run(cfg: PipelineSections) -> str:
    if cfg.serve is None:
        raise UserError("the pipeline config has no serve section: nothing is served")
    s = build(cfg, "serve", ServeConfig, section(cfg, "serve", cfg.serve))  # as jobs.pipeline builds it
    url = app_url(s)
    rows = [("OpenAI-compatible HTTP", f"{url}/v1 (completions, chat/completions, embeddings, classify, models)"),
            ("health", f"{url}/health")]
    if s.grpc.port:
        rows.append(("gRPC", f"{s.http.host}:{s.grpc.port} (helio.v1.Helio, grpc.health.v1.Health; "
                             f"metadata application: {s.name})"))
    rows += [(m.id, f"{m.task}: {m.artifact}") for m in s.models]
    print(format_summary(f"application '{s.name}'", rows))
    try:
        print(samples(s, url), flush=True)
    except urllib.error.HTTPError as e:
        raise UserError(f"{url} answered {e.code}: {e.read().decode(errors='replace')[:300]}") from None
    except (urllib.error.URLError, ConnectionError) as e:
        raise UserError(f"nothing answers at {url} ({getattr(e, 'reason', e)}): is the application running? "
                        "(make demo starts it)") from None
    return url


CONFIG_CLASS = PipelineSections


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.query", __doc__, PipelineSections, run, argv)


if __name__ == "__main__":
    sys.exit(main())
