"""Hyper-parameter sweeps: the Optuna search driver, the Dask cluster, applying the best
trial, the report."""
