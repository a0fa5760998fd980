"""Non-learned reference detectors (baselines the trained models must beat)."""
