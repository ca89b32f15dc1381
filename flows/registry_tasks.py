"""Recording a promotion from the flow: one Prefect task around
:func:`pipeline.release.registry.record`.

Retries are declared here, once: a git or DVC remote that is briefly unreachable is
retried; a rejected push (another worker was first) is already retried inside ``record``
with the next version, so a task retry only happens for network trouble.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.core.config import Config
from pipeline.release.registry import record

RECORD_RETRIES = 2
RECORD_RETRY_DELAY_S = 15


@task(
    name="record-version",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=RECORD_RETRIES,
    retry_delay_seconds=RECORD_RETRY_DELAY_S,
)
def record_task(repo: Path, cfg: Config, push: bool) -> dict[str, Any]:
    """Commit the run, push DVC data, register + assign the version (GTO), push git."""
    logger = get_run_logger()
    result = record(cfg, repo, push=push, say=logger.info)
    logger.info("record: %s", result.summary())
    return {
        "version": result.version,
        "commit": result.commit,
        "tags": list(result.tags),
        "pushed": result.pushed,
        "reason": result.reason,
    }
