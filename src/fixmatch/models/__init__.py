"""Model registry: build any network by name.

    >>> from fixmatch.models import create_model, list_models
    >>> model = create_model("wrn28_2", num_classes=10)

Architectures register themselves with ``@register_model(name)`` on a factory
``(num_classes, in_channels, **kwargs) -> nn.Module``; the submodules are imported
at the bottom of this file so that importing the package fills the registry.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["ModelError", "count_parameters", "create_model", "list_models", "register_model"]

ModelFactory = Callable[..., nn.Module]
FactoryT = TypeVar("FactoryT", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


class ModelError(ValueError):
    """Raised for an unknown model name."""


def register_model(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator registering a factory ``(num_classes, in_channels, **kwargs) -> nn.Module``."""

    def decorator(factory: FactoryT) -> FactoryT:
        # Refuse silent overwrites: two architectures sharing a name would make
        # checkpoints and configs ambiguous.
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``; extra ``kwargs`` go to its constructor.

    Every factory accepts ``image_size`` (an int or (height, width)): the side of the images the
    model will see, from which the convolutional backbones choose their stem (``models/stem.py``)
    and ViTs size their position embedding; models that do not depend on it ignore it.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except ValueError as e:  # an impossible setting (e.g. an image side that is no multiple of the patch)
        raise ModelError(f"cannot build {name}: {e}") from None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# Imported last, for their registration side effect: they need register_model above.
from fixmatch.models import cnn, densenet, mobilenetv3, resnet, vit, wideresnet  # noqa: E402,F401
from fixmatch.models.cnn import SmallCNN  # noqa: E402
from fixmatch.models.densenet import DenseNet  # noqa: E402
from fixmatch.models.mobilenetv3 import MobileNetV3  # noqa: E402
from fixmatch.models.resnet import ResNet  # noqa: E402
from fixmatch.models.vit import VisionTransformer  # noqa: E402
from fixmatch.models.wideresnet import WideResNet  # noqa: E402

__all__ += ["DenseNet", "MobileNetV3", "ResNet", "SmallCNN", "VisionTransformer", "WideResNet"]
