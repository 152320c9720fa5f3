"""LEED's learner on RLlib 2.60 without a Ray cluster: the learner and an env runner are built in
this process, episodes are sampled once, and the same fixed batch (episodes + demonstrations) is
used for every update, so only the loss decides what changes."""

import pytest
import torch

from edgeray.config import load_config
from rl.leed.algorithms import build_algo_config, module_of
from rl.leed.config import LEEDConfig
from rl.leed.demonstrations import DemonstrationGenerator
from rl.leed.learners import DEMO_STATE_KEY, expert_nll

STEPS = 200


def _setup(method, **expert):
    from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner

    from rl.envs.routing import make_routing_env
    from rl.envs.routing_rllib import RoutingMultiAgentEnv

    train = {"env_steps_per_iter": STEPS, "minibatch_size": STEPS, "num_epochs": 1}
    cfg = load_config(LEEDConfig, data={"env": {"num_agents": 3}, "train": train, "expert": {"decay": 0.9, **expert}})
    config = build_algo_config(method, cfg)
    learner = config.build_learner(env=RoutingMultiAgentEnv(make_routing_env(cfg.env)))
    runner = MultiAgentEnvRunner(config=config)
    episodes = runner.sample(num_timesteps=STEPS, random_actions=False)
    demos = DemonstrationGenerator(cfg).generate(0).for_modules(module_of(cfg))
    return learner, episodes, demos


def _nll(learner, demos):
    with torch.no_grad():
        return sum(float(expert_nll(learner.module[m], torch.as_tensor(o), torch.as_tensor(a)))
                   for m, (o, a) in demos.items())


def _updates(learner, episodes, n):
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    for i in range(n):
        learner.update(episodes=episodes, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: STEPS * (i + 1)})


@pytest.fixture(scope="module")
def torch_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_expert_loss_decreases_on_a_fixed_batch_and_lambda_decays(torch_one_thread):
    learner, episodes, demos = _setup("leed")
    learner.set_demonstrations(demos)
    before = _nll(learner, demos)
    weights = []
    for _ in range(4):
        weights.append(learner.current_expert_weight())
        _updates(learner, episodes, 1)
    leed_after = _nll(learner, demos)
    assert weights == pytest.approx([1.0, 0.9, 0.81, 0.729])
    assert leed_after < before

    # the same PPO updates without the expert term (IPPO) move the NLL far less, if at all
    ippo, _, _ = _setup("ippo")
    ippo_before = _nll(ippo, demos)
    _updates(ippo, episodes, 4)
    assert (before - leed_after) > 2 * (ippo_before - _nll(ippo, demos))


def test_expert_batch_size_caps_the_rows_per_loss(torch_one_thread):
    learner, _, demos = _setup("leed", expert_batch_size=2)
    learner.set_demonstrations(demos)
    module_id = next(iter(demos))
    obs, actions = learner._demo_batch(module_id)
    assert len(actions) == 2 and obs.shape == (2, demos[module_id][0].shape[1])


def test_bc_pretraining_fits_the_demonstrations_and_leaves_lambda_zero(torch_one_thread):
    learner, _, demos = _setup("bc-ppo", bc_pretrain_steps=60)
    report = learner.set_demonstrations(demos)
    for module_id in demos:
        assert report["bc_nll_after"][module_id] < 0.5 * report["bc_nll_before"][module_id]
    assert learner.current_expert_weight() == 0.0
    assert learner.set_demonstrations(demos) == {}  # behaviour cloning runs once, on the first demonstrations


def test_learner_state_carries_demonstrations_and_schedule(torch_one_thread):
    learner, episodes, demos = _setup("leed")
    learner.set_demonstrations(demos)
    _updates(learner, episodes, 2)
    state = learner.get_state()
    assert state[DEMO_STATE_KEY]["updates"] == 2
    fresh, _, _ = _setup("leed")
    fresh.set_state(state)
    assert fresh.current_expert_weight() == pytest.approx(0.81)
    assert fresh.num_demonstrations() == {m: len(a) for m, (_, a) in demos.items()}
    assert _nll(fresh, demos) == pytest.approx(_nll(learner, demos), rel=1e-5)
