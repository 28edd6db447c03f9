"""The unlearner contract, re-exported for plugins written against this path.

Its home is :mod:`umig.unlearner`; import from there in new code.
"""

from umig.unlearner import (
    Job,
    NodeContext,
    NodeResult,
    NodeSnapshot,
    NodeUnlearner,
    NodeUpdate,
    Param,
    Task,
    Unlearner,
    available,
    describe,
    get,
    register,
)

__all__ = ["Job", "NodeContext", "NodeResult", "NodeSnapshot", "NodeUnlearner", "NodeUpdate", "Param", "Task",
           "Unlearner", "available", "describe", "get", "register"]
