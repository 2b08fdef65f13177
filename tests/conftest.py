"""Fixtures shared by the trainer tests: the tiny built-in model and the shipped sample dataset."""
import os

import pytest
import torch

from trainer_core.backends.diffusers import tiny_parts
from trainer_core.dataset import DatasetConfig, ImageDataset

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_dataset")


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    return tiny_parts(seed=0)


@pytest.fixture(scope="module")
def dataset():
    return ImageDataset.from_folder(DatasetConfig(folder=SAMPLES, instance_token="skkmtn", resolution=64))
