"""One module per pipeline process; each exposes run(settings, *, ctx=None, stop=None) -> int."""
