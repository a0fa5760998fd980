"""Data layer: MIDOG readers, lazy slides, synthetic data, sampling, augmentation, pipeline."""
