"""RLlib-hosted methods: environments (`envs`: non-stationary classic control for DEER, multi-vehicle
routing for LEED), the train / checkpoint / resume loop they share (`loop`), DEER (`deer`), LEED
(`leed`), (later) RL-CRP; `cli` is `edgeray rl`."""
