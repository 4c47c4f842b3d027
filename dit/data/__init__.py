"""Datasets: the bundled shapes dataset, image folders, and pre-extracted latent shards."""

from dit.data.flip import flip_decision
from dit.data.folders import BadImageError, CaptionDataset, ImageFolderDataset, center_crop_arr
from dit.data.latents import LatentDataset, check_manifest, read_manifest
from dit.data.shapes import ShapesDataset, materialise

__all__ = [
    "BadImageError",
    "CaptionDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "ShapesDataset",
    "center_crop_arr",
    "check_manifest",
    "flip_decision",
    "materialise",
    "read_manifest",
]
