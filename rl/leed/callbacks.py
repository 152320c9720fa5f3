"""The driver side of LEED: generate demonstrations, hand them to the learners, refine the prompt.

  * `on_algorithm_init`: build the `DemonstrationGenerator` (env + LLM client, loaded once in the
    driver), generate round 0 and call `set_demonstrations` on every learner (for bc-ppo that also
    runs behaviour cloning, after which the env runners get the cloned weights);
  * `on_train_result`: every `expert.refine_every` iterations (LEED only) build a refinement
    prompt from the agents' per-agent mean returns of this iteration and the previous round's
    expert returns and congested roads, regenerate, and hand the new demonstrations over. With
    `expert.keep_better_demos` [R] new demonstrations whose expert return is lower are dropped;
  * every iteration's result gets a "leed" entry (round, backend, valid-instruction share, repair
    counts, expert return), which rl/leed/run.py puts in metrics.jsonl.
The generator's round and last demonstrations are saved with each checkpoint (`state()` /
`load_state()`, called by rl/leed/run.py), so a resumed run refines from where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray.rllib.callbacks.callbacks import RLlibCallback

log = logging.getLogger("edgeray.leed")


class LEEDCallback(RLlibCallback):
    def __init__(self):
        super().__init__()
        self.generator = None
        self.demos = None        # the demonstrations the learners hold now
        self.round = 0
        self.events: dict = {}   # what happened since the last result (BC, a refinement)

    def on_algorithm_init(self, *, algorithm, metrics_logger=None, **kwargs) -> None:
        from edgeray.config import load_config
        from rl.leed.config import LEEDConfig
        from rl.leed.demonstrations import DemonstrationGenerator

        extra = algorithm.config.learner_config_dict
        self.cfg = load_config(LEEDConfig, data=extra["leed_config"])
        self.method = extra["leed_method"]
        self.module_of = extra["leed_module_of"]
        out = Path(extra["leed_run_dir"]) / "demos" if extra.get("leed_run_dir") else None
        self.generator = DemonstrationGenerator(self.cfg, out_dir=out)
        self._hand_over(algorithm, self.generator.generate(0))

    def _hand_over(self, algorithm, demos) -> None:
        by_module = demos.for_modules(self.module_of)
        results = algorithm.learner_group.foreach_learner(lambda learner: learner.set_demonstrations(by_module))
        bc = [r for r in _values(results) if r]
        if bc:
            self.events["bc"] = bc[0]
            # the env runners still hold the initial weights: the first rollouts must already
            # come from the cloned policy ("BC, then PPO")
            algorithm.env_runner_group.sync_weights(from_worker_or_learner_group=algorithm.learner_group,
                                                    inference_only=True)
        self.demos = demos
        self.round = demos.round

    def on_train_result(self, *, algorithm, metrics_logger=None, result, **kwargs) -> None:
        iteration = result["training_iteration"]
        every = self.cfg.expert.refine_every
        if self.method == "leed" and every and iteration % every == 0:
            agent_returns = result.get("env_runners", {}).get("agent_episode_returns_mean") or {}
            candidate = self.generator.generate(self.round + 1, {a: float(r) for a, r in agent_returns.items()})
            kept = self.cfg.expert.keep_better_demos and candidate.episode_return < self.demos.episode_return
            self.events["refinement"] = {"round": candidate.round, "candidate_return": candidate.episode_return,
                                         "previous_return": self.demos.episode_return, "kept_previous": bool(kept)}
            if kept:
                self.round = candidate.round
                self.generator.last = self.demos
            else:
                self._hand_over(algorithm, candidate)
        result["leed"] = {**self.demos.summary(), "round": self.round, **self.events}
        self.events = {}

    # --------------------------------------------------------------- checkpoint (rl/leed/run.py)
    def state(self) -> dict:
        return {"round": self.round, "demos": self.demos, "last": self.generator.last}

    def load_state(self, state: dict) -> None:
        """After a resume: refine from the saved round and demonstrations (the learners restored
        their copy themselves; this is what the summary and the next prompt need)."""
        self.round, self.demos, self.generator.last = state["round"], state["demos"], state["last"]


def _values(results) -> list:
    """foreach_learner's return values (a list for a local learner, RemoteCallResults otherwise)."""
    if isinstance(results, list):
        return results
    return [r.get() for r in results]
