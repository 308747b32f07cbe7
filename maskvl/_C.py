"""maskvl's C++ CPU kernels (``csrc/*.cpp``): importing this module registers them as the CPU kernels
of the ``maskvl::`` ops.

The compiled library is ``maskvl._C_impl``. It links against torch's shared libraries (libc10,
libtorch), which the dynamic loader finds only once torch has been imported, so this module imports
torch first; it also imports ``maskvl.ops``, which defines the op schemas, so that
``torch.ops.maskvl.*`` is callable right after ``import maskvl._C`` in a fresh interpreter.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libc10 / libtorch for the compiled library)

from . import ops  # noqa: F401  (the op schemas)
from . import _C_impl  # noqa: F401  (static TORCH_LIBRARY_IMPL(maskvl, CPU, ...) registrations)
