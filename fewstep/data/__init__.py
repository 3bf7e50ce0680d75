"""Datasets (digits, Fashion-MNIST, image folders, prompt sets, tensor files) and the resumable, sharded batch
stream."""

from fewstep.data.digits import DigitsDataset
from fewstep.data.fashion import FashionMNISTDataset
from fewstep.data.image_folder import ImageFolderDataset, LatentCache, load_image
from fewstep.data.loader import BatchStream, build_batches
from fewstep.data.prompts import PromptDataset
from fewstep.data.tensors import TensorFileDataset

__all__ = [
    "BatchStream",
    "DigitsDataset",
    "FashionMNISTDataset",
    "ImageFolderDataset",
    "LatentCache",
    "PromptDataset",
    "TensorFileDataset",
    "build_batches",
    "load_image",
]
