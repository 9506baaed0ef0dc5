"""Object storage behind one small interface (`Store`): S3 (or an S3-compatible store) and local folders.

`base` is the interface and what the backends share, `local` and `s3` the backends (each imports only
`base`), `factory.open_store(uri)` picks one by URI. Nothing outside this package imports botocore.
"""

from job.storage.base import ObjectInfo, Store
from job.storage.factory import open_store, set_operation_timeout

__all__ = ["ObjectInfo", "Store", "open_store", "set_operation_timeout"]
