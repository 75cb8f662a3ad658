"""Image datasets for jcdm: ArrayRecord shards on disk, read with Grain, deterministic everywhere.

Public API:

* `make_train_iterator(...)` (gin: `make_train_iterator`): the training stream, see
  `jcdm.data.pipeline`.
* `dataset_spec(dataset, image_size=...)`: the `ImageSpec` that stream will have.
* `ImageRecordSource(directory)`: validated random access to a converted split (FID statistics).
* `convert_cifar10`, `convert_image_folder`, `convert_digits`: writers behind
  `tools/prepare_cifar10.py`.
* `DataError`: every bad-input error, raised before training starts.
"""

from jcdm.data.convert import convert_cifar10, convert_digits, convert_image_folder
from jcdm.data.pipeline import TrainIterator, make_train_iterator
from jcdm.data.records import ImageRecordSource
from jcdm.data.sources import dataset_spec, load_digits_images, open_source
from jcdm.data.spec import DataError, ImageSpec
from jcdm.data.writer import write_image_records

__all__ = [
    "DataError",
    "ImageRecordSource",
    "ImageSpec",
    "TrainIterator",
    "convert_cifar10",
    "convert_digits",
    "convert_image_folder",
    "dataset_spec",
    "load_digits_images",
    "make_train_iterator",
    "open_source",
    "write_image_records",
]
