"""LEED's experiment config: one `LEEDConfig` drives LEED and both baselines ("ippo": PPO with no
demonstrations; "bc-ppo": behaviour cloning on the demonstrations, then PPO) with the same env,
policy and PPO settings; only the use of demonstrations differs.

Importing it starts nothing and imports neither Ray nor torch: the CLI loads and checks a config
before it connects to Ray. Settings marked [R] are our reconstruction (see rl/leed/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.config import param, section
from edgeray.errors import UserError
from rl.envs.routing import RoutingEnvSection
from rl.loop import LoopSection

LEED_METHODS = ("leed", "ippo", "bc-ppo")
LLM_BACKENDS = ("planner", "http", "transformers")
SCHEDULES = ("exponential", "linear", "constant")


@dataclass
class LLMSection:
    """Where the instructions come from (rl.leed.llm)."""
    backend: str = param("planner", "planner = the NON-LLM shortest-path fallback; http = any OpenAI-compatible "
                         "chat endpoint (e.g. `edgeray serve svd`); transformers = a local causal LM",
                         choices=LLM_BACKENDS)
    url: str = param("http://127.0.0.1:8000/v1", "http: base URL of the endpoint; /chat/completions is appended")
    model: str = param("smollm2-135m", "http: the `model` field sent with each request")
    api_key_env: str = param("", "http: name of an environment variable holding a bearer token (empty: none)")
    timeout_s: float = param(60.0, "http: seconds before a request is given up", gt=0)
    model_path: str = param("data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "transformers: a .gguf file, a local HF checkpoint directory, or 'tiny-random'; "
                            "relative paths are taken from the repo root")
    max_new_tokens: int = param(160, "longest answer per prompt, in tokens", ge=8)
    temperature: float = param(0.0, "sampling temperature (0 = greedy, reproducible)", ge=0)
    prompt_scope: str = param("joint", "joint = one prompt for all agents (the paper's); per_agent = one prompt "
                              "per agent, batched (for small models with short contexts) [R]",
                              choices=("joint", "per_agent"))
    fallback: str = param("planner", "when the endpoint or model cannot be reached: planner (with a warning) "
                          "or error (stop with a one-line error naming the URL / path)", choices=("planner", "error"))
    planner_detour_share: float = param(0.0, "planner: share of agents sent via a random intermediate "
                                        "intersection, an imperfect expert (0 = shortest paths) [R]", ge=0, le=1)
    threads: int = param(2, "transformers: torch threads while generating", ge=1)
    answer_prefix: str = param('[["', "transformers: text the answer is started with, so a small model writes the "
                               "JSON list instead of prose (SmolLM2-135M: 0 of 4 prompts parsed without it) [R]")


@dataclass
class ExpertSection:
    """The expert loss and prompt refinement (rl.leed.learners, rl.leed.callbacks)."""
    lambda0: float = param(1.0, "lambda_0: weight of the expert NLL at iteration 0 [R]", ge=0)
    schedule: str = param("exponential", "lambda_k: exponential = lambda_0 * decay^k, linear = lambda_0 -> "
                          "lambda_min over decay_iters, constant = lambda_0 [R]", choices=SCHEDULES)
    decay: float = param(0.95, "exponential: decay factor per iteration [R]", gt=0, le=1)
    decay_iters: int = param(50, "linear: iterations from lambda_0 to lambda_min [R]", ge=1)
    lambda_min: float = param(0.0, "floor of lambda_k [R]", ge=0)
    expert_batch_size: int = param(512, "demonstration rows per expert-loss evaluation (all when fewer)", ge=1)
    decision_steps_only: bool = param(True, "keep only steps where the expert's action moved the vehicle "
                                      "(departed, at an intersection) [R]")
    keep_better_demos: bool = param(True, "on refinement, keep the previous demonstrations when the new ones "
                                    "have a lower expert return [R]")
    refine_every: int = param(5, "iterations between prompt refinements (0 = never); LEED only", ge=0)
    bc_pretrain_steps: int = param(200, "bc-ppo: gradient steps of behaviour cloning before PPO", ge=1)
    bc_lr: float = param(1e-3, "bc-ppo: learning rate of behaviour cloning", gt=0)


@dataclass
class PolicySection:
    """Who owns which network."""
    sharing: str = param("per_agent", "per_agent = one policy per agent (the paper's decentralized PO); "
                         "shared = one policy for all agents (large agent counts)", choices=("per_agent", "shared"))
    hidden: list[int] = param([64, 64], "hidden layer sizes of the policy and value networks")


@dataclass
class TrainSection(LoopSection):
    """PPO and the schedule, shared by all three methods (plus the loop's seed, stop_iters,
    checkpoint_every, torch_threads)."""
    env_steps_per_iter: int = param(1000, "agent steps per iteration (train_batch_size_per_learner)", ge=32)
    minibatch_size: int = param(256, "PPO minibatch size", ge=8)
    num_epochs: int = param(4, "PPO epochs per iteration", ge=1)
    lr: float = param(3e-4, "learning rate", gt=0)
    gamma: float = param(0.99, "discount", gt=0, le=1)
    gae_lambda: float = param(0.95, "GAE lambda", ge=0, le=1)
    clip_param: float = param(0.2, "PPO clip", gt=0)
    entropy_coeff: float = param(0.01, "entropy bonus", ge=0)
    num_env_runners: int = param(0, "remote env runners (0 = sample in the driver)", ge=0)

    def validate(self) -> None:
        if self.minibatch_size > self.env_steps_per_iter:
            raise UserError(f"train.minibatch_size={self.minibatch_size} must be <= "
                            f"train.env_steps_per_iter={self.env_steps_per_iter}")


@dataclass
class LEEDConfig:
    """One training run of LEED or a baseline on a routing env."""
    env: RoutingEnvSection = section(RoutingEnvSection)
    llm: LLMSection = section(LLMSection)
    expert: ExpertSection = section(ExpertSection)
    policy: PolicySection = section(PolicySection)
    train: TrainSection = section(TrainSection)

    def validate(self) -> None:
        if self.env.backend == "sumo" and self.train.num_env_runners == 0:
            raise UserError("env.backend=sumo needs train.num_env_runners >= 1: libsumo runs one simulation "
                            "per process, and the driver's own one runs the expert demonstrations")
