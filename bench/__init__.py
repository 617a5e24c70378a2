"""Side-by-side benchmarks of s2sgw against a direct connection, stunnel, HAProxy and nginx.

``python -m bench [--quick] [--only NAME]`` builds a throwaway PKI, starts every proxy pair with the
same certificates on 127.0.0.1, measures each figure several times in alternation and writes JSON
plus a reStructuredText table under ``bench/results/``. Ratios measured in the same run are the
result; absolute figures drift with the machine.
"""
