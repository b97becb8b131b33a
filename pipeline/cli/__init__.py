"""The `sluice` command line.

entry.py is the executable (short paths for `sluice run` and `sluice query`);
app.py the typer app and the pipeline commands; data.py and service.py register
their commands on it; shared.py is what they all use.
"""
