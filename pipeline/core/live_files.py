"""dvclive as a file writer for pipeline stages (dvc.yaml declares metrics and plots).

``dvclive.Live`` looks for a DVC repository and its git revision when it starts, to tie
the run to an experiment. A stage of ``dvc repro`` needs none of that, and the lookup
fails outright (``SCMError: Empty git repo``, not caught by dvclive) in a repository
without commits, after a whole training. :class:`FileLive` skips it and only writes
dvclive's files (``metrics.json``, ``plots/``).
"""

from __future__ import annotations

from typing import Any

from dvclive import Live


class FileLive(Live):
    """``Live(dir, dvcyaml=False, save_dvc_exp=False)`` without DVC or git discovery."""

    def __init__(self, directory: str) -> None:
        super().__init__(dir=directory, dvcyaml=False, save_dvc_exp=False)

    def _init_dvc(self, *args: Any, **kwargs: Any) -> None:
        # What Live._init_dvc sets that later calls read; no experiment, no dvc.yaml.
        self._dvc_file = self._init_dvc_file()
