"""Data: the shard format and manifest, sources and ``prepare``, the stream, the loader, and the
training data feed (``open_train_data``).

``python -m fmgen.data prepare ...`` writes shards (the command itself lives in ``fmgen.cli``).
"""

from fmgen.data.loader import ShardLoader
from fmgen.data.pipeline import (
    DATA_SOURCES,
    InMemoryData,
    StreamData,
    check_data_config,
    ensure_shards,
    open_train_data,
    read_all,
)
from fmgen.data.shards import (
    IMAGE_FORMATS,
    MANIFEST,
    DataError,
    Example,
    Manifest,
    ShardInfo,
    read_manifest,
    write_shards,
)
from fmgen.data.sources import SOURCES, digits_images, fit_image, prepare
from fmgen.data.stream import to_float

__all__ = [
    "DATA_SOURCES",
    "IMAGE_FORMATS",
    "MANIFEST",
    "SOURCES",
    "DataError",
    "Example",
    "InMemoryData",
    "Manifest",
    "ShardInfo",
    "ShardLoader",
    "StreamData",
    "check_data_config",
    "digits_images",
    "ensure_shards",
    "fit_image",
    "open_train_data",
    "prepare",
    "read_all",
    "read_manifest",
    "to_float",
    "write_shards",
]
