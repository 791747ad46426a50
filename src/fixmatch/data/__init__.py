"""Data sets, labeled/unlabeled splits and safe loading of dataset files."""

from .datasets import Dataset, DatasetError, default_data_dir, list_datasets, load_dataset
from .download import download_file, file_md5
from .safe_pickle import safe_load_pickle
from .split import Split, SplitError, load_split, make_split, save_split

__all__ = [
    "Dataset",
    "DatasetError",
    "Split",
    "SplitError",
    "default_data_dir",
    "download_file",
    "file_md5",
    "list_datasets",
    "load_dataset",
    "load_split",
    "make_split",
    "safe_load_pickle",
    "save_split",
]
