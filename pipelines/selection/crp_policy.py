"""RL-CRP's policy network in plain torch (no Ray, no RLlib): the same ``CRPPolicyNet`` is the
inside of the RLlib module that trains it (rl/crp/module.py) and of the FL selector that runs it
(pipelines/selection/crp.py), so an exported ``state_dict`` loads in either.

One edge server's observation is a flat vector (``pipelines.selection.crp.EdgeTracker.observation``):
``num_clients x len(FEATURES)`` per-client features, ``len(GLOBALS)`` edge-wide values, then a
``num_clients`` mask of the clients it may pick now. The net scores every client with one MLP
shared across clients (so the order of clients does not matter [R]) and the mean embedding as
context; masked clients get ``MASKED_LOGIT``. The value head reads the context.

``client_bias`` [R, a named switch, ``policy.client_bias``]: a learned logit offset per covered
client (its position in the observation), added to the shared scorer's logit. The paper's policy
outputs |C_m| logits from the server's whole state (notes/rl.md A1 step 5), so it can tell its
clients apart; a scorer shared across clients without it sees only their features, and two
servers covering a client see the same static features of it (latency, size), so it cannot
express "leave this client to the other server" (a convention that needs to know which client is
which). False reproduces the earlier, purely feature-based policy.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.selection.crp import FEATURES, GLOBALS

MASKED_LOGIT = -1e9


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers)


class CRPPolicyNet(nn.Module):
    def __init__(self, num_clients: int, hidden: list[int] | tuple[int, ...] = (64, 64), client_bias: bool = False):
        super().__init__()
        self.num_clients = num_clients
        self.bias = nn.Parameter(torch.zeros(num_clients)) if client_bias else None
        width = int(hidden[-1])
        per_client = len(FEATURES) + len(GLOBALS)
        self.encoder = _mlp([per_client, *map(int, hidden)])
        self.score = nn.Sequential(nn.Linear(2 * width, width), nn.Tanh(), nn.Linear(width, 1))
        self.value = nn.Sequential(nn.Linear(width + len(GLOBALS), width), nn.Tanh(), nn.Linear(width, 1))

    def split(self, obs: torch.Tensor):
        n, f, g = self.num_clients, len(FEATURES), len(GLOBALS)
        feats = obs[..., :n * f].reshape(*obs.shape[:-1], n, f)
        return feats, obs[..., n * f:n * f + g], obs[..., n * f + g:]

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked logits over the clients, value) for a batch of observations."""
        feats, glob, mask = self.split(obs)
        x = torch.cat([feats, glob.unsqueeze(-2).expand(*feats.shape[:-1], glob.shape[-1])], dim=-1)
        emb = self.encoder(x)
        ctx = emb.mean(dim=-2)
        logits = self.score(torch.cat([emb, ctx.unsqueeze(-2).expand_as(emb)], dim=-1)).squeeze(-1)
        if self.bias is not None:
            logits = logits + self.bias
        logits = torch.where(mask > 0.5, logits, torch.full_like(logits, MASKED_LOGIT))
        return logits, self.value(torch.cat([ctx, glob], dim=-1)).squeeze(-1)
