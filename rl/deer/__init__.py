"""DEER (arXiv 2509.15032): experience replay prioritized by the discrepancy of environment dynamics.

Read in this order: `detector` (reward-window change detector), `priorities` (pre/post-change
priority rules), `fast_replay` (a vectorized subclass of RLlib's PER buffer and the DQN / SAC
training step that uses it), `buffer` (DEER's subclass of it), `learners` (DQN/SAC learner subclasses: DoE and
priorities), `callbacks` (driver loop: detect -> mark buffer -> snapshot Q), `config` (the one
ExperimentConfig of DEER and the PER / uniform baselines), `algorithms` (their RLlib builders),
`run` (their hooks into the shared train / checkpoint / resume loop, `rl.loop`), `analysis`
(evaluation). Pure parts (detector, priorities, config, analysis) need no Ray.
"""
