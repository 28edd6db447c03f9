"""umig: a model lineage manager that can make a whole family of models forget.

Public API: :class:`Store` (open or create a lineage store, add nodes, plan and run
unlearning, revert, purge, history), the result types of the engine and the
lineage recorders used from training code.
"""

from umig.errors import UmigError
from umig.store import NodeInfo, Store, Version

__version__ = "0.1.0"

__all__ = ["Store", "NodeInfo", "Version", "UmigError", "__version__"]


def __getattr__(name: str):
    # Heavier modules load on first use so `import umig` stays cheap for the CLI.
    if name in ("UnlearnResult", "NodeOutcome"):
        from umig import unlearning

        return getattr(unlearning, name)
    if name in ("FederatedRecorder",):
        from umig import lineage

        return getattr(lineage, name)
    raise AttributeError(f"module 'umig' has no attribute {name!r}")
