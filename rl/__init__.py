"""RLlib-hosted methods: non-stationary environments, DEER, (later) RL-CRP and LEED."""
