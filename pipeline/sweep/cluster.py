"""The Dask cluster a sweep runs on: an existing scheduler, or an embedded LocalCluster.

The same sweep code runs on both: a laptop gets a LocalCluster of worker processes, a
team points ``sweep.dask_address`` (or the flow's ``MNIST_DASK_ADDRESS``) at a
``dask scheduler`` whose ``dask worker`` processes run on other machines. Workers need
the project's Python package importable (``pip install .``) and nothing else: no shared
filesystem, no Prefect API access.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.core.config import SweepConfig
from pipeline.core.errors import ClusterError

if TYPE_CHECKING:
    from distributed import Client


def local_worker_count(sweep: SweepConfig) -> int:
    """``sweep.local_workers``, or one worker per core (each with ``trial_threads``)."""
    if sweep.local_workers:
        return sweep.local_workers
    return max(1, (os.cpu_count() or 1) // sweep.trial_threads)


@contextmanager
def dask_client(sweep: SweepConfig, address: str | None = None) -> Iterator[Client]:
    """A connected :class:`distributed.Client`; closed (and a LocalCluster stopped) on exit.

    ``address``: a scheduler (``tcp://host:8786``); None = ``sweep.dask_address``; if
    that is null too, a LocalCluster of :func:`local_worker_count` processes with
    ``sweep.trial_threads`` threads each. Raises :class:`ClusterError` when the scheduler
    cannot be reached within ``sweep.connect_timeout_s`` or has no worker by then.
    """
    from distributed import Client, LocalCluster

    address = address or sweep.dask_address
    if address is None:
        with (
            LocalCluster(
                n_workers=local_worker_count(sweep),
                threads_per_worker=sweep.trial_threads,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(address, timeout=sweep.connect_timeout_s)
    except (OSError, TimeoutError, ValueError) as err:
        raise ClusterError(
            f"sweep.dask_address: cannot reach a Dask scheduler at {address!r} within "
            f"{sweep.connect_timeout_s:g} s ({type(err).__name__}: {err})"
        ) from err
    try:
        try:
            client.wait_for_workers(1, timeout=sweep.connect_timeout_s)
        except TimeoutError as err:
            raise ClusterError(
                f"the Dask scheduler at {address!r} has no worker after "
                f"{sweep.connect_timeout_s:g} s; start `dask worker {address}`"
            ) from err
        yield client
    finally:
        client.close()
