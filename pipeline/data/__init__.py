"""The ingest and validate stages: MNIST sources, IDX parsing, the versioned dataset,
statistics, the holdout carve."""
