"""The ``torch.distributed.checkpoint`` adapter: ``S3StorageReader``."""

from ._storage_reader import S3StorageReader

__all__ = ["S3StorageReader"]
