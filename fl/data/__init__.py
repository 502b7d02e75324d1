"""fedprobe's data layer: registered datasets, partitioners, the federated view.

>>> from fl.config import DataConfig
>>> fd = load_federated(DataConfig(dataset="digits"), num_clients=10, seed=0)
>>> train, val = fd.partition(0)
>>> batch = fd.collate([train[i] for i in range(4)])  # {"pixel_values": [4, 1, 8, 8], "labels": [4]}
"""

from fl.data import datasets as _datasets  # noqa: F401  (registers digits)
from fl.data import digits_subset as _digits_subset  # noqa: F401  (registers digits_subset)
from fl.data import local as _local  # noqa: F401  (registers image_folder, text_csv, text_jsonl, hf_disk)
from fl.data import textgen as _textgen  # noqa: F401  (registers textgen, textgen_lm)
from fl.data.base import DATASETS, ArrayDataset, DataError, LoadedData, collate, word_tokenizer
from fl.data.federated import FederatedData, ServerData, load_dataset, load_federated, load_server_data
from fl.data.partition import PartitionError, dirichlet_partition, iid_partition, label_skew

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DataError",
    "FederatedData",
    "LoadedData",
    "PartitionError",
    "ServerData",
    "collate",
    "dirichlet_partition",
    "iid_partition",
    "label_skew",
    "load_dataset",
    "load_federated",
    "load_server_data",
    "word_tokenizer",
]
