"""Every message kind, registered: import this module to encode or decode any of them."""

from . import audit, events  # noqa: F401  (each registers its kinds with wire)
from .wire import MAX_FRAME, REGISTRY, decode, decode_records, encode  # noqa: F401
