"""FedAvg and its two classic variants on the strategy protocol.

Reading order: ``settings.py`` (what a user can set; imports no torch, so the driver checks a
config against it), then ``strategy.py`` (the algorithm: FedAvg, FedProx as two overrides,
FedAvgM as a server-side ``aggregate``).
"""
