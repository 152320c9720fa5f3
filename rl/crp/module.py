"""RL-CRP's RLModule: `CRPPolicyNet` (pipelines/selection/crp_policy.py, plain torch) inside an
RLlib `TorchRLModule` with the `ValueFunctionAPI` PPO needs. The module adds nothing to the net,
so `module.net.state_dict()` is the exported policy the FL selector loads."""

from __future__ import annotations

from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from pipelines.selection.crp_policy import CRPPolicyNet


class CRPTorchRLModule(TorchRLModule, ValueFunctionAPI):
    def setup(self):
        cfg = self.model_config or {}
        self.net = CRPPolicyNet(self.action_space.n, cfg.get("hidden", [64, 64]), cfg.get("client_bias", False))

    def _forward(self, batch, **kwargs):
        logits, _ = self.net(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: logits}

    def compute_values(self, batch, embeddings=None):
        return self.net(batch[Columns.OBS])[1]
