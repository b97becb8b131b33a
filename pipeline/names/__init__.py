"""What enrich and policy know of a destination's name.

namer.py is enrich's pure knowledge (DNS mappings, tracked hostnames, when a
reverse lookup is due); reverse.py runs those lookups beside the loop;
answers.py is policy's memory of the names it opened for DNS answers.
"""
