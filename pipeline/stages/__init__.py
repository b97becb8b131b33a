"""One module per pipeline process; each exposes run(settings, *, ctx=None, stop=None) -> int."""

from __future__ import annotations

import importlib
import os


def run_named(stage: str) -> int:
    """`sluice run STAGE`: the settings from the environment, the stage's logger, its loop.
    SettingsError (and any SluiceError at start) reaches the caller, which prints one line."""
    from ..settings import Settings, configure_logging

    settings = Settings.from_env(os.environ)
    configure_logging(settings, f"sluice.{stage}")
    return importlib.import_module(f"pipeline.stages.{stage}").run(settings)
