"""Triton kernels of the maskvl ops and their launchers: a leaf package.

Importing this package imports nothing, not even triton, and nothing here imports ``maskvl``.
transformers looks for Hugging Face's kernel hub package, also called ``kernels``, and imports
whatever package of that name it finds on ``sys.path``; run from a source checkout's root, that is
this folder, which must then import cleanly with or without triton (and, lacking a ``__version__``,
is not taken for the hub package). The submodules import triton:

``loo_attention``, ``loo_group_attention``, ``head_distances``, ``vector_distances``, ``decode_attention``,
``gated_delta_knockout``
    one op each: its kernels and the launcher that takes torch tensors
``distances``
    the distance formula as a Triton device function (shared by the two distance ops)
``_launch``
    the single launch point (device guard, compile-only runs), compute dtypes, version rules and the
    numerics of the compiled code
``compile_check``
    a tool (``make compile-check``): compiles every kernel for sm_80 and sm_90 without a GPU

``maskvl.ops`` imports the op modules (installed as ``maskvl._kernels``; see ``setup.py``) and
registers the launchers as the CUDA kernels of the ``maskvl::`` ops. Set ``TRITON_INTERPRET=1``
before they are first imported to run them on CPU tensors through the Triton interpreter.
"""

OPS = ("loo_attention", "loo_group_attention", "head_distances", "vector_distances", "decode_attention",
       "gated_delta_knockout")
