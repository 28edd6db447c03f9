"""Label ids and head rows: the one place that maps between them.

Heads of one lineage differ in size (incremental and transfer steps), so every node
records ``classes``: ``classes[row]`` is the label id that output row predicts. Rows
are matched by label id, never by index.

>>> import torch
>>> label_rows(torch.tensor([7, 3]), (100, 3, 7)).tolist()
[2, 1]
>>> label_rows(torch.tensor([2, 0, 5]), range(3), strict=False).tolist()
[2, 0, -1]
>>> [t.tolist() for t in shared_rows((1, 2, 3), (3, 1))]
[[0, 2], [1, 0]]
>>> rows_of((5, 6, 7), {7, 5})
[0, 2]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from umig.errors import LabelError


def check_unique(classes: Sequence[int], what: str = "classes") -> None:
    """Raise ``LabelError`` when ``classes`` lists a label id twice."""
    classes = tuple(classes)
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise LabelError(f"{what} list label ids more than once: {dup}")


def label_rows(labels: Tensor, classes: Sequence[int], *, strict: bool = True) -> Tensor:
    """Map label ids to head rows (``classes[row] == label``), vectorised, on ``labels``' device.

    With ``strict`` a label absent from ``classes`` raises ``LabelError`` naming it;
    otherwise its row is -1.
    """
    labels = labels.reshape(-1).to(torch.int64)
    k = len(classes)
    if k == 0:
        rows = torch.full_like(labels, -1)
    elif classes[0] == 0 and classes[-1] == k - 1 and (isinstance(classes, range) or tuple(classes) == tuple(range(k))):
        # Rows are the labels themselves (the common head over 0..K-1): a range check, not a search;
        # training and the FIM capture map every batch.
        valid = (labels >= 0) & (labels < k)
        if strict and bool(valid.all()):
            return labels.clone()
        rows = torch.where(valid, labels, -1)
    else:
        table = torch.as_tensor(list(classes), dtype=torch.int64, device=labels.device)
        sorted_cls, order = torch.sort(table)
        pos = torch.searchsorted(sorted_cls, labels).clamp_(max=len(classes) - 1)
        found = sorted_cls[pos] == labels
        rows = torch.where(found, order[pos], torch.full_like(pos, -1))
    if strict and labels.numel() and bool((rows < 0).any()):
        missing = int(labels[rows < 0][0])
        shown = list(classes) if len(classes) <= 20 else f"{len(classes)} labels"
        raise LabelError(f"label {missing} is not among the head's classes ({shown})")
    return rows


def shared_rows(a_classes: Sequence[int], b_classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Head rows of the labels two heads share: ``(rows in a, rows in b)``, in a's row order."""
    pos = {int(c): i for i, c in enumerate(b_classes)}
    pairs = [(i, pos[int(c)]) for i, c in enumerate(a_classes) if int(c) in pos]
    return (torch.tensor([i for i, _ in pairs], dtype=torch.long),
            torch.tensor([j for _, j in pairs], dtype=torch.long))


def rows_of(classes: Sequence[int], labels: Iterable[int]) -> list[int]:
    """The rows of a head that predict any of ``labels`` (ascending)."""
    wanted = {int(x) for x in labels}
    return [r for r, c in enumerate(classes) if int(c) in wanted]
