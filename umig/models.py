"""Small in-repo models, addressable as ``umig.models:NAME`` architecture specs.

Each is a ``features`` trunk followed by the classifier head ``fc`` (an ``nn.Linear``), and
declares ``input_shape`` so head detection never has to guess.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["MODELS", "HeadedNet", "digits_cnn", "digits_mlp", "tiny_mlp"]

DIGITS_SHAPE = (1, 8, 8)  # sklearn's digits: 8x8 grey images


class HeadedNet(nn.Module):
    """``fc(features(x))``: a trunk producing a feature vector and a linear classifier head."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.features = features
        self.fc = nn.Linear(feature_dim, num_classes)
        self.input_shape = tuple(input_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def digits_cnn(num_classes: int = 10, width: int = 16) -> HeadedNet:
    """CNN for 1x8x8 digits: 2x(3x3 conv+BN+ReLU), 2x2 max-pool, Linear(->64)+ReLU, head ``fc``."""
    _positive(num_classes=num_classes, width=width)
    features = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 4 * 4, 64),
        nn.ReLU(),
    )
    return HeadedNet(features, 64, num_classes, DIGITS_SHAPE)


def digits_mlp(num_classes: int = 10, hidden: int = 64) -> HeadedNet:
    """MLP for 1x8x8 digits: flatten, Linear(64->hidden)+ReLU, head ``fc``."""
    _positive(num_classes=num_classes, hidden=hidden)
    features = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
    return HeadedNet(features, hidden, num_classes, DIGITS_SHAPE)


def tiny_mlp(in_features: int = 16, num_classes: int = 10, hidden: int = 64) -> HeadedNet:
    """MLP over flat ``in_features`` vectors, for synthetic scale tests: Linear+ReLU, head ``fc``."""
    _positive(in_features=in_features, num_classes=num_classes, hidden=hidden)
    features = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
    return HeadedNet(features, hidden, num_classes, (in_features,))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "digits_mlp": digits_mlp,
    "tiny_mlp": tiny_mlp,
}
