"""Image-level mitosis classification: does a field hold a mitotic figure?

The SOFTEC AIC'24 write-up (Irfan, SPADES team C) as a method of this codebase,
on MIDOG fields (labels from the point annotations) or any labelled CSV:

  * ``fields``: items (fields cut from MIDOG images, or whole images), the
    labelling rule, reading and resampling, class balance;
  * ``datasets``: the train / val / held-out items of an experiment;
  * ``features``: sliding-window EfficientNet features and their cache;
  * ``heads``: the dense head, the random forest (as plain arrays), the ensemble;
  * ``metrics``: F1, precision, recall, ROC AUC, confusion, curves as PNG, CSVs;
  * ``round1``: frozen features + heads (``python -m midog_jax.main``);
  * ``finetune``: round 2, EfficientNet fine-tuned end to end through the
    shared training loop in two stages;
  * ``baseline``: image-level labels from a trained detector (above the
    evaluation layer: it runs whole-image detection).

``detectors/image_level.py`` selects the round for ``config.method ==
"image_level"``; ``midog_jax.classify`` scores new images with a workdir.
"""
