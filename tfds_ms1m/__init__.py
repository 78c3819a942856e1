"""The `ms1m_arcface` tensorflow-datasets builder and insightface RecordIO / `.bin` tools.

Importing this package registers the builder, so `tfds build ms1m_arcface --imports tfds_ms1m`
finds it.
"""

from tfds_ms1m.ms1m_arcface import ms1m_arcface_dataset_builder
from tfds_ms1m.ms1m_arcface.ms1m_arcface_dataset_builder import Builder

__all__ = ["Builder", "ms1m_arcface_dataset_builder"]
