"""The trio_taskworker server: REST API, subscription websocket, dispatcher, storage."""

from ._server import TaskServer, default_data_dir
from ._sqlite import SQLiteStore
from ._store import Store

__all__ = ["SQLiteStore", "Store", "TaskServer", "default_data_dir"]
