"""A restricted unpickler for CIFAR-format batch files.

Unpickling runs arbitrary callables named in the file, so a tampered data set
could execute code. CIFAR batches only need numpy's array/dtype reconstruction
(plus ``_codecs.encode``, which Python 3 uses for bytes in protocol-2 pickles,
restricted here to latin-1), so every other global is refused before anything
is called.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import numpy as np

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

__all__ = ["safe_load_pickle", "RestrictedUnpickler"]


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Stand-in for _codecs.encode that cannot reach arbitrary (possibly custom) codecs.
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1", errors)


# Objects are mapped by name (not imported by name) so old pickles naming
# numpy.core still load on numpy 2 without touching its deprecated shim.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "scalar"): scalar,
    # Protocol-5 array pickles (e.g. a re-saved batch) rebuild via np.frombuffer.
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals in ``_ALLOWED``."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only numpy arrays are allowed in data set pickles"
            ) from None


def safe_load_pickle(src: bytes | bytearray | memoryview | IO[bytes]) -> object:
    """Unpickle ``src`` (bytes or a binary file object) with ``encoding='bytes'``.

    Raises ``pickle.UnpicklingError`` naming any disallowed global.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(src)
    return RestrictedUnpickler(src, encoding="bytes").load()
