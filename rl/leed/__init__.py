"""LEED (arXiv 2509.14680): LLM-empowered expert demonstrations for multi-agent RL, on RLlib 2.60
(new API stack) and a PettingZoo multi-vehicle routing env (`rl.envs.routing`, SUMO: `rl.envs.routing_sumo`).

Read in this order: `prompt` (the road network, tasks and objectives as text; refinement
feedback), `llm` (the backends: an OpenAI-compatible HTTP endpoint, a local transformers model,
and the shortest-path planner that is NOT an LLM), `instructions` (parse and validate
`[Command, Parameter, AgentID]`, repairs counted), `demonstrations` (execute the plans into
per-agent expert trajectories; the generator that runs a round), `learners` (PPO learner + lambda_k
x expert NLL), `callbacks` (generation and refinement in the driver), `config` (one LEEDConfig for
LEED and the baselines IPPO and BC-then-PPO), `algorithms` (their RLlib builders), `run` (their
hooks into the shared loop, `rl.loop`), `analysis` (evaluation). Only `learners`, `callbacks`,
`algorithms` and `run` import Ray.

The paper's rules [P] (notes/rl.md A3, from reviews of the paper; its exact formulas were not
retrievable): a demonstration-generation module in which an LLM, given the road-network
adjacency, each agent's start, goal and departure and the objectives, writes `[Command,
Parameter, AgentID]` instructions that are executed in the environment to give expert
trajectories, with periodic prompt refinement from agent and expert trajectories; and a
decentralized policy-optimization module where each agent adds an expert-policy loss on its own
demonstrations to its own PPO loss.

Our reconstruction [R], each a named, tested, switchable setting:
  * the expert loss is NLL (behaviour cloning) weighted by lambda_k: `expert.schedule`
    (exponential / linear / constant), `expert.lambda0`, `expert.decay`, `expert.lambda_min`;
  * only decision steps enter the demonstrations: `expert.decision_steps_only`;
  * refinement every `expert.refine_every` iterations with per-agent returns and congested roads;
    a worse refinement is dropped: `expert.keep_better_demos`;
  * one prompt for all agents or one per agent: `llm.prompt_scope`;
  * the non-LLM fallback and when it applies: `llm.backend: planner`, `llm.fallback`;
  * parameter sharing for large agent counts: `policy.sharing`;
  * the whole environment (observation, action, reward, BPR congestion): `env.*` (rl/envs/routing.py).
"""
