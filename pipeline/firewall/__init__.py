"""The firewall: the one writer of the maps and the decisions that ask it to write.

writer.py programs and diffs the maps (the seed's FirewallUpdater); outcome.py
decides one event (pure) and hands the policy stage a late-allow plan; opening.py
plans late-allow and writes a DNS answer's addresses; recentblocks.py keeps the
blocks a later DNS answer re-labels late-allowed.
"""
