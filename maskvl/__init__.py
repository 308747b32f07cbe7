"""maskvl: which input tokens a vision-language model uses, layer by layer, as it answers."""

__version__ = "0.1.0"
