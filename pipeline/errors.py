"""Typed start-up errors: the CLI turns each into one readable line and an exit code."""


class SluiceError(Exception):
    """An error a user can act on; str(err) is the whole message, one line."""

    exit_code = 1


class SettingsError(SluiceError):
    exit_code = 2


class PolicyError(SluiceError):
    exit_code = 3


class KernelError(SluiceError):
    """A missing kernel feature or a failed load/attach."""

    exit_code = 4


class StoreError(SluiceError):
    exit_code = 5


class MessageError(ValueError):
    """A message on a socket that does not match its schema (counted, never fatal).

    `reason` is the stable part (what is logged once); `detail` the offending value."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
