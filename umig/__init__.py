"""umig: a model lineage manager that can make a whole family of models forget.

Public API: :class:`Store` (open or create a lineage store, add nodes, plan and run
unlearning, revert, purge, history), the result types of the engine and the
lineage recorders used from training code.
"""

from umig.api import Store
from umig.errors import UmigError
from umig.lineage import (
           DataParallelRecorder,
           FederatedRecorder,
           IncrementalRecorder,
           TransferRecorder,
)
from umig.store import NodeInfo, Version
from umig.unlearning import NodeOutcome, UnlearnResult

__version__ = "0.1.0"

__all__ = ["Store", "NodeInfo", "Version", "UmigError", "UnlearnResult", "NodeOutcome", "FederatedRecorder",
           "DataParallelRecorder", "IncrementalRecorder", "TransferRecorder", "__version__"]
