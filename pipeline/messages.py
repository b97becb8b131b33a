"""Every message kind, registered: import this module to encode or decode any of them."""

from . import events  # noqa: F401  (each registers its kinds with wire)
from .audit import records  # noqa: F401
from .wire import MAX_FRAME, REGISTRY, decode, decode_records, encode  # noqa: F401
