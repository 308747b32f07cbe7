"""maskvl: which input tokens a vision-language model uses, layer by layer, as it answers."""

__version__ = "0.1.0"


def sweep(*args, **kwargs):
    """Run a sweep; see :func:`maskvl.api.sweep` (imported lazily so ``import maskvl`` stays light)."""
    from .api import sweep as _sweep

    return _sweep(*args, **kwargs)
