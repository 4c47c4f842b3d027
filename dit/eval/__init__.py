"""Evaluation: Frechet distance, Inception Score, precision/recall, the FID Inception and the bundled-data evaluator."""

from .features import compute_activations, evaluate_sources, iter_images, reference_statistics
from .inception import FID_WEIGHTS_URL, FIDInceptionV3, load_fid_inception
from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall

__all__ = [
    "FID_WEIGHTS_URL", "FIDInceptionV3", "compute_activations", "evaluate_sources", "feature_statistics",
    "frechet_distance", "inception_score", "iter_images", "load_fid_inception", "precision_recall",
    "reference_statistics",
]
