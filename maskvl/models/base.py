"""The contract between maskvl and a model family: :class:`ModelAdapter`.

The engine (``maskvl/engine.py``), the naive oracle (``maskvl/naive.py``), the API and batch runs reach a
model only through the members listed here; a family implements all of them in one file under
``maskvl/models/`` and registers its transformers ``model_type`` with
:func:`maskvl.models.registry.register`. :class:`maskvl.models.decoder.TransformersDecoderAdapter`
implements the parts common to transformers decoders.
"""

from __future__ import annotations

import abc
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch


#: Kinds of grid: the whole image as one grid (Qwen), a base view or thumbnail covering the whole image
#: beside tiles, a tile covering a crop.
GRID_KINDS = ("image", "base", "thumbnail", "tile")


@dataclass
class GridInfo:
    """One grid of an image's tokens: ``rows x cols`` tokens, row-major from ``token_start``.

    ``row_stride`` is the distance in positions from one row's first token to the next row's (``cols``
    when the rows are contiguous; ``cols + 1`` when a separator token ends each row, as LLaVA-OneVision's
    newline). ``box = (x0, y0, x1, y1)`` is the region of the ORIGINAL image the grid covers, in its pixel
    coordinates (a grid over a padded canvas may extend beyond the image: the processor's own padding).
    Positions in the grid's range that are not grid cells (separators) are text-kind tokens.
    """

    rows: int
    cols: int
    token_start: int
    box: tuple[float, float, float, float]
    kind: str = "image"
    row_stride: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRID_KINDS:
            raise ValueError(f"grid kind {self.kind!r} is not one of {GRID_KINDS}")
        if self.row_stride is None:
            self.row_stride = self.cols
        if self.rows < 1 or self.cols < 1 or self.row_stride < self.cols:
            raise ValueError(f"bad grid: {self.rows}x{self.cols}, row stride {self.row_stride}")

    @property
    def token_end(self) -> int:
        """One past the grid's last cell."""
        return self.token_start + (self.rows - 1) * self.row_stride + self.cols

    def positions(self) -> list[int]:
        """The cells' sequence positions, row-major: ``[rows * cols]``."""
        return [self.token_start + r * self.row_stride + c for r in range(self.rows) for c in range(self.cols)]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.rows, "cols": self.cols, "token_start": self.token_start,
                "token_end": self.token_end, "row_stride": self.row_stride,
                "box": [float(round(b, 4)) for b in self.box]}


@dataclass
class ImageInfo:
    """Where one image sits in the sequence and how it was tokenized.

    ``grids``: the image's token grids (``GridInfo``). A family that makes one grid of the whole image
    (the Qwen VL line) leaves it empty and gets one grid of kind ``image`` from ``grid_rows``,
    ``grid_cols`` and ``token_start``; a tiled family (base view or thumbnail plus tiles) lists them all,
    and ``grid_rows``/``grid_cols`` name the first one (the base view, or the first tile when there is
    none). ``token_start``/``token_end`` span all of the image's tokens (separators included).
    """

    index: int
    path: str | None
    grid_rows: int  # merged-token grid
    grid_cols: int
    token_start: int  # first image pad position
    token_end: int  # exclusive
    original_size: tuple[int, int]  # (width, height)
    resized_size: tuple[int, int]  # (width, height) after the processor's resize
    grids: list[GridInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.grids:
            w, h = self.original_size
            self.grids = [GridInfo(self.grid_rows, self.grid_cols, self.token_start, (0.0, 0.0, float(w), float(h)))]

    def positions(self) -> list[int]:
        """Every grid cell's sequence position (the image's image-kind tokens), grid by grid."""
        return [p for g in self.grids for p in g.positions()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "grid_rows": self.grid_rows,
            "grid_cols": self.grid_cols,
            "token_start": self.token_start,
            "token_end": self.token_end,
            "original_size": list(self.original_size),
            "resized_size": list(self.resized_size),
            "grids": [g.to_dict() for g in self.grids],
        }


@dataclass
class Prepared:
    """A tokenized prompt with its images, ready for the clean prefill.

    ``input_ids`` is ``[1, S]``; ``model_inputs`` holds everything else the model's forward takes
    (pixel values, grids, token type ids). ``is_image`` is ``[S]`` bool (True on image pad tokens).
    """

    input_ids: torch.Tensor
    model_inputs: dict[str, Any]
    is_image: torch.Tensor
    images: list[ImageInfo] = field(default_factory=list)
    prompt_text: str = ""


@dataclass
class Capture:
    """What one clean forward leaves for the measures, at its final position.

    Attributes:
        x: per layer, the decoder layer's input at the final position, ``[d_model]`` (model dtype).
        q: per layer, the final position's query after q_norm and RoPE, ``[H, D]`` (model dtype).
        logits: the next-token logits at the final position, ``[V]``.
        rope: the final position's rotary ``(cos, sin)``, ``[D]`` each (model dtype).
        layer_rope: per layer, that layer's ``(cos, sin)`` where layers differ (Gemma 3's local and global
            layers have their own rotary bases); None where every layer uses ``rope``.
        gate: per layer, the final position's output gate ``[H, D]`` (already through its sigmoid) that
            multiplies the attention output before o_proj (Qwen3.5's gated attention); None where the
            model has none. The gate comes from the final position's own input, so masking leaves it alone.
    Keys and values of every position are read from the KV cache with :meth:`ModelAdapter.kv`. At a
    linear-attention layer (:meth:`ModelAdapter.layer_kind`) ``q`` is None and the layer's inputs come
    from :meth:`ModelAdapter.linear_state`.
    """

    x: list[torch.Tensor]
    q: list[torch.Tensor | None]
    logits: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    layer_rope: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    gate: list[torch.Tensor | None] | None = None

    def rope_at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The final position's rotary ``(cos, sin)`` at ``layer``."""
        return self.layer_rope[layer] if self.layer_rope is not None else self.rope


@dataclass
class LinearState:
    """A linear-attention layer (Gated DeltaNet) as the knockout op takes it, for the current sequence.

    ``q [Hk, dk]`` the final position's query, ``k [T, Hk, dk]``, ``v [T, Hv, dv]``, ``g, beta [T, Hv]``
    (after the layer's causal conv, before the q/k L2 norms: ``maskvl.ops.gated_delta_knockout``'s inputs),
    ``z [Hv, dv]`` the final position's output gate, ``scale`` the query scale; in the compute dtype.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    z: torch.Tensor
    scale: float


# ``attend(q [B, H, D], k_prefix [T, KV, D], v_prefix, k_own [B, KV, D], v_own, scale, exclude [B])``
# -> ``[B, H, D]``: the backend's shared-prefix decode attention (``maskvl.ops.decode_attention``).
AttendFn = Callable[..., torch.Tensor]


class ModelAdapter(abc.ABC):
    """Everything maskvl asks of a model family.

    Attributes every adapter sets:
        model_id: what the user passed (hub id, directory, ``builtin:...``); recorded in the metadata.
        num_layers, num_heads, num_kv_heads, head_dim, hidden_size, vocab_size: the decoder's shape.
        max_positions: positions the model was trained for (None if unknown); longer runs are refused.
        scale: the attention softmax scale.
        dtype, device: where and how the weights live.
        supports_images: whether :meth:`prepare` accepts images.
        has_attention_norm: whether a norm follows o_proj before the residual add (Gemma 3, OLMo 2):
            then :meth:`attention_norm` is applied to the attention output; ``Full`` includes it,
            ``Attn`` and ``Head_N`` are measured before it.
    """

    #: transformers ``config.model_type`` values this adapter handles (the registry's keys).
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()

    model_id: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None
    scale: float
    dtype: torch.dtype
    device: torch.device
    supports_images: bool = False
    has_attention_norm: bool = False

    # ------------------------------------------------------------------------------- loading
    @classmethod
    @abc.abstractmethod
    def load(cls, path: str, model_id: str, dtype: torch.dtype, device: torch.device,
             verbose: bool = False) -> "ModelAdapter":
        """Load model, tokenizer and processors from a local hub-like directory or a hub id.

        Raises :class:`maskvl.errors.ModelLoadError` with a one-line message when it cannot.
        """

    @classmethod
    @abc.abstractmethod
    def from_loaded(cls, model: Any, tokenizer: Any, image_processor: Any = None,
                    model_id: str | None = None) -> "ModelAdapter":
        """Wrap an already-loaded transformers model and its tokenizer (and image processor)."""

    @classmethod
    @abc.abstractmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """Write a tiny random model of this family as a hub-like directory (``maskvl make-tiny-model``).

        ``shape`` takes ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``hidden_size`` and
        family-specific config overrides. The directory loads back through :meth:`load`.
        """

    # -------------------------------------------------------------------------------- inputs
    @abc.abstractmethod
    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None],
                max_pixels: int | None = None) -> Prepared:
        """Chat-template ``prompt`` with ``images`` (PIL, in prompt order) and tokenize it.

        ``max_pixels`` caps the resized image size. Raises :class:`maskvl.errors.InputError` for
        inputs the model cannot take.
        """

    @abc.abstractmethod
    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token decoded on its own."""

    @abc.abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        """The text of a token sequence (special tokens kept)."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (``--target-token`` text)."""

    @abc.abstractmethod
    def stop_token_ids(self) -> set[int]:
        """Tokens that end greedy generation."""

    # ---------------------------------------------------------------------------- clean pass
    @abc.abstractmethod
    def new_cache(self) -> Any:
        """An empty KV cache for :meth:`prefill` and :meth:`decode`."""

    @abc.abstractmethod
    def prefill(self, prepared: Prepared, cache: Any) -> Capture:
        """The model's own forward over the whole prompt, filling ``cache``."""

    @abc.abstractmethod
    def decode(self, token_id: int, cache: Any) -> Capture:
        """The model's own forward of one more token against ``cache``."""

    @abc.abstractmethod
    def kv(self, cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (after norm and RoPE) and values of every position at ``layer``: ``[T, KV, D]`` each.

        The cache keeps every position, also at sliding-window layers (see :meth:`attention_window`).
        """

    def attention_window(self, layer: int) -> int | None:
        """How many keys a query sees at ``layer`` (itself included), or None for full causal attention.

        A sliding-window layer lets the query at position i attend to keys ``i - window < j <= i`` only
        (transformers' ``sliding_window``): a key outside the final query's window has no effect there.
        """
        return None

    ATTENTION: ClassVar[str] = "attention"
    LINEAR: ClassVar[str] = "linear"

    def layer_kind(self, layer: int) -> str:
        """``"attention"`` (softmax attention over a KV cache) or ``"linear"`` (a linear-attention layer:
        Qwen3.5's Gated DeltaNet, knocked out by skipping a position's write; see :meth:`linear_state`)."""
        return self.ATTENTION

    def layer_heads(self, layer: int) -> int:
        """How many heads ``Head_N`` covers at ``layer``: ``num_heads``, or a linear layer's value heads."""
        return self.num_heads

    def linear_state(self, cache: Any, layer: int, dtype: torch.dtype) -> LinearState:
        """A linear-attention layer's inputs for the current sequence, in ``dtype``."""
        raise NotImplementedError(f"{type(self).__name__} has no linear-attention layers")

    def linear_norm(self, layer: int, core: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A linear layer's gated norm of readouts ``core [N, Hv, dv]`` with the gate ``z [Hv, dv]``:
        ``[N, Hv, dv]``, the input of its output projection (:meth:`o_proj_weight`)."""
        raise NotImplementedError(f"{type(self).__name__} has no linear-attention layers")

    def replay_linear(self, layer: int, h: torch.Tensor, cache: Any, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`replay_layer` at a linear-attention layer: each row ``h [B, d_model]`` takes its own single
        step on the shared clean conv tail and recurrent state before the final position (no row copies
        the state). Returns ``[B, d_model]``."""
        raise NotImplementedError(f"{type(self).__name__} has no linear-attention layers")

    def knockout_linear(self, layer: int, positions: list[int] | None) -> contextlib.AbstractContextManager:
        """The naive oracle's knockout at a linear layer: within the block, the model's own forward gives
        the final position the layer's output with ``positions``' writes skipped and every other position
        its clean output (the layer run once more, only the final row spliced). None: no change."""
        raise NotImplementedError(f"{type(self).__name__} has no linear-attention layers")

    # ---------------------------------------------------------------------- replayed pieces
    @abc.abstractmethod
    def o_proj_weight(self, layer: int) -> torch.Tensor:
        """``[d_model, H * D]`` (at a linear layer its output projection, ``[d_model, Hv * dv]``)."""

    def o_proj_bias(self, layer: int) -> torch.Tensor | None:
        """``[d_model]``, or None where o_proj has no bias. ``Attn`` includes it; ``Head_N`` does not."""
        return None

    def attention_sinks(self, layer: int) -> torch.Tensor | None:
        """Learned sink logits ``[H]`` in the softmax denominator at ``layer`` (GPT-OSS), or None."""
        return None

    def attention_norm(self, layer: int, attn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What the layer adds to the residual stream for o_proj outputs ``attn [N, d_model]``: the norm
        after attention where :attr:`has_attention_norm`, else ``attn`` itself."""
        return attn

    @abc.abstractmethod
    def post_attention(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer's MLP branch for residual rows ``h [N, d_model]`` (norms + MLP), in ``dtype``."""

    @abc.abstractmethod
    def replay_layer(self, layer: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     k_prefix: torch.Tensor, v_prefix: torch.Tensor, exclude: torch.Tensor,
                     attend: AttendFn, dtype: torch.dtype) -> torch.Tensor:
        """One decoder layer for B single-position rows ``h [B, d_model]`` at the final position.

        Attention runs through ``attend`` against the shared clean prefix ``[T, KV, D]`` (the keys before
        the final position that the final query sees at this layer: at a sliding-window layer, only
        those inside the window), each row leaving out key ``exclude[b]`` (an index into that prefix;
        -1: none, T: its own). Returns ``[B, d_model]``.
        """

    @abc.abstractmethod
    def final_logits(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Final norm and LM head for rows ``h [B, d_model]``: ``[B, V]``."""

    # ------------------------------------------------------------- the naive oracle's needs
    @abc.abstractmethod
    def forward_full(self, prepared: Prepared, generated: list[int]) -> torch.Tensor:
        """A fresh, cache-less forward of the prompt plus ``generated``; the final logits ``[V]``."""

    @abc.abstractmethod
    def decoder_layer(self, layer: int) -> torch.nn.Module:
        """The decoder layer module (hooks read its input and output)."""

    @abc.abstractmethod
    def o_proj(self, layer: int) -> torch.nn.Module:
        """The attention output projection module of ``layer``."""

    @abc.abstractmethod
    def attention_config(self) -> Any:
        """The config object whose ``_attn_implementation`` the decoder's attention modules read."""
