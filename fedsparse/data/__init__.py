"""Data layer: dataset sources, partitioners and the on-device `FederatedData`."""

from fedsparse.data.federated import FederatedData
from fedsparse.data.federated import make_federated_data
from fedsparse.data.federated import PartitionInfo
from fedsparse.data.partition import Partition
from fedsparse.data.partition import partition
from fedsparse.data.partition import PARTITIONERS
from fedsparse.data.sources import Dataset
from fedsparse.data.sources import DATASETS
from fedsparse.data.sources import NPZ_PREFIX
from fedsparse.data.sources import load_dataset
from fedsparse.data.sources import normalize

__all__ = [
    'DATASETS',
    'NPZ_PREFIX',
    'Dataset',
    'FederatedData',
    'PARTITIONERS',
    'Partition',
    'PartitionInfo',
    'load_dataset',
    'make_federated_data',
    'normalize',
    'partition',
]
