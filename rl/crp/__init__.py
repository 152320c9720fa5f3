"""RL-CRP (arXiv 2602.02458, Conflict-Aware Client Selection for Multi-Server Federated Learning):
decentralized RL client selection for edge servers with overlapping coverage, with HMM
conflict-risk prediction, trained on RLlib 2.60 (new API stack) and run by the FL runtime.

Read in this order:
  * pipelines/selection/conflict_risk.py: the per-server HMM (hmmlearn) and its lagged risk;
  * pipelines/selection/crp.py: what one server knows (`EdgeTracker`), its observation, the k-pick
    loop, the export format and the FL selector `rl-crp` (`RLCRPSelector`, no RLlib);
  * pipelines/selection/crp_policy.py: the policy network (plain torch);
  * rl/envs/crp.py: the simulation on pipelines/population.py and the reward; rl/envs/crp_rllib.py:
    the RLlib MultiAgentEnv (one agent per server);
  * here: `config` (one CRPConfig for rl-crp and the rl-no-crp ablation), `module` (the net as an
    RLModule), `callbacks` (episode metrics), `algorithms` (independent PPO, one module per
    server), `run` (hooks into rl.loop; the export), `analysis` (`edgeray rl eval rl-crp`: the
    exported policies against random, greedy-latency and the conflict-free oracle), `diagnose`
    (cheap checks of the env without Ray: baselines and a decentralized conflict-free rule, the
    risk feature's AUC, small REINFORCE learners; docs/rl_crp.md "Diagnosis").
Only `module`, `callbacks`, `algorithms` and `run` import Ray.

The paper's rules [P] (notes/rl.md A1, from reviews of the paper): servers with overlapping
coverage pick clients on their own; a client picked by several servers is contended; each server
keeps a sparse, lagged record of the clients it picked; a categorical HMM per client history
predicts the conflict risk by the forward algorithm on O[0:t-d] carried d steps ahead; a
fairness-aware reward (latency, contention, long-term participation); decentralized execution.

Our reconstruction [R], each a named, tested setting: the conflict rules (selection.conflict_rule:
share / fail) and what a server learns of a conflict (`contenders`); the sparse coding
(env.risk_coding), one shared HMM per server, its start and refit schedule (env.risk_*); the
observation features (pipelines/selection/crp.py FEATURES; env.coverage_features, env.home_rule,
env.observed_feature); the contested setting (configs/crp_contested.yaml: shared clients without an
owner, Gilbert-Elliott links `markov` in pipelines/population.py); the action as k masked one-client
steps; the reward and its weights (env.latency_weight, conflict_weight, fairness, fairness_weight)
and when its conflict term is paid (env.conflict_credit: round / pick); the per-client logit offset
(policy.client_bias); PPO as the learner (the paper's algorithm was not recovered).
"""
