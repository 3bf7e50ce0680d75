"""Evaluation: the digits benchmark (FID in a digits classifier's feature space, class accuracy, speed)."""

from fewstep.eval.digits import (
    DigitsClassifier,
    DigitsMetrics,
    DigitsRow,
    digits_images,
    digits_report,
    format_table,
    report_noise,
)

__all__ = [
    "DigitsClassifier",
    "DigitsMetrics",
    "DigitsRow",
    "digits_images",
    "digits_report",
    "format_table",
    "report_noise",
]
