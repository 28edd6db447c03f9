"""Exceptions a user can cause. Each carries one clear line naming the problem; the CLI prints it and exits 1."""


class UmigError(Exception):
    """Base class for errors caused by user input or store state (never by a bug)."""


class NotFoundError(UmigError):
    """A node, version, operation, file or data reference that does not exist."""


class GraphError(UmigError):
    """A change that would break the lineage graph (cycle, duplicate, dangling edge)."""


class ArchError(UmigError):
    """An architecture spec that cannot be built, or a checkpoint that does not fit it."""


class DataError(UmigError):
    """A data reference that cannot be resolved, or whose fingerprint changed."""


class IntegrityError(UmigError):
    """A blob whose content no longer matches its hash (corruption on disk)."""


class LockTimeout(UmigError):
    """Another umig process holds the store's write lock for too long."""


class UnlearningError(UmigError):
    """An unlearning request that cannot be planned or executed (unknown labels, missing prerequisites)."""


class SupersededError(UmigError):
    """A node derived from a version an unlearning operation superseded, or trained on data it forgot."""


class LabelError(UmigError, ValueError):
    """A label id a head cannot predict, or a class list naming a label twice."""
