"""RLlib-hosted methods: non-stationary environments (`envs`), the train / checkpoint / resume loop
they share (`loop`), DEER (`deer`), (later) RL-CRP and LEED; `cli` is `edgeray rl`."""
