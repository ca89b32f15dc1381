"""The evaluate stage: test metrics, the robustness suite, calibration, abstention,
the quality report."""
