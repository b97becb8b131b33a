"""`sluice report`: what a run contacted, blocked and refused, its posture, and the allowlist
change that would let the blocked destinations through.

data.py reads the store (the summary views); suggestion.py drafts the allowlist diff;
render.py writes markdown and JSON, html.py one self-contained HTML page; gate.py reads the
expected-blocks file and says which blocks were not expected.
"""
