"""DEER (arXiv 2509.15032): experience replay prioritized by the discrepancy of environment dynamics.

Read in this order: `detector` (reward-window change detector), `priorities` (pre/post-change
priority rules), `buffer` (RLlib PER subclass), `learners` (DQN/SAC learner subclasses: DoE and
priorities), `callbacks` (driver loop: detect -> mark buffer -> snapshot Q), `algorithms`
(config + RLlib builders for DEER and the PER / uniform baselines), `run` (run directories,
checkpoints, resume), `analysis` (evaluation). Pure parts (detector, priorities, analysis) need no Ray.
"""
