"""Conflict-risk prediction of RL-CRP (Conflict-Aware Client Selection for Multi-Server Federated
Learning, arXiv:2602.02458), on plain data: numpy + hmmlearn, no Ray, no RLlib, no torch.

One ``ConflictRiskModel`` per edge server, over the clients it covers. The server's record is
sparse and lagged: it learns a client's outcome only for rounds in which it picked the client
itself, and only ``lag`` (d) rounds later.

The paper's rules [P] (notes/rl.md A1): a categorical HMM lambda = (A, B, pi) over conflict
events (o = 1 conflict, o = 0 normal); the risk p_i(t) of client i at round t comes from the
forward algorithm on the lagged sequence O_i[0 : t-d], the state distribution carried d steps
ahead (A^d), then the probability of a conflict emission; the model is refitted as data comes in.

Our reconstruction [R], each a named, tested setting of ``RiskSettings``:
  * ``coding`` (how the sparse record becomes a sequence):
      - ``three_symbol`` (default): one symbol per round and client, V = 3: 0 not picked by this
        server (uninformative), 1 picked and no conflict, 2 picked and conflicted; the risk is
        P(o=2 | picked) = P(2) / (P(1) + P(2)) at round t. Runs directly in hmmlearn.
      - ``observed_only``: the paper's V = 2 on the observed rounds only; the gaps between them are
        carried by A^gap in our own forward pass. hmmlearn fits on the observed symbols as if they
        were consecutive (an approximation: Baum-Welch with gaps is not in hmmlearn).
  * one HMM per server, shared by all its clients (fitted on their sequences with ``lengths=``),
    since a single client's record is too sparse to fit alone; each client's risk still comes from
    its own sequence;
  * ``refit_every`` R rounds (Baum-Welch, ``n_iter`` iterations, ``n_states`` K hidden states);
    before the first fit (fewer than R known rounds) the risk is the client's own share of
    conflicts among its known picks, shrunk toward the server's pooled share with the weight of
    one pick ((conflicts_i + pooled) / (picks_i + 1));
  * a conflict event is a pick that another server also picked that round (``ClientOutcome.contenders``
    > 0, or ``conflict_lost``), see pipelines/selection/__init__.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from edgeray.errors import UserError

CODINGS = ("three_symbol", "observed_only")
NOT_PICKED, PICKED_OK, PICKED_CONFLICT = 0, 1, 2   # three_symbol coding
OK, CONFLICT = 0, 1                                # observed_only coding


@dataclass(frozen=True)
class RiskSettings:
    coding: str = "three_symbol"   # see the module docstring
    n_states: int = 2              # K hidden states of the HMM
    lag: int = 2                   # d: an outcome of round s is known from round s + d on (d >= 1)
    refit_every: int = 10          # R: refit the HMM every R known rounds
    n_iter: int = 30               # Baum-Welch iterations per fit

    def __post_init__(self):
        if self.coding not in CODINGS:
            raise UserError(f"conflict-risk coding {self.coding!r} is not one of {', '.join(CODINGS)}")
        for name, low in (("n_states", 1), ("lag", 1), ("refit_every", 1), ("n_iter", 1)):
            if getattr(self, name) < low:
                raise UserError(f"conflict-risk {name}={getattr(self, name)} must be >= {low}")


class ConflictRiskModel:
    """One edge server's HMM over the clients it covers (local indices 0..num_clients-1)."""

    def __init__(self, num_clients: int, settings: RiskSettings = RiskSettings(), seed: int = 0):
        self.n, self.settings, self.seed = num_clients, settings, seed
        self.rounds: list[int] = []          # the rounds recorded, increasing
        self.rows: list[np.ndarray] = []     # three_symbol: one symbol per client per recorded round
        self.hmm = None                      # the fitted hmmlearn model (None before the first fit)
        self.fits = 0
        self._filtered = 0                   # rows consumed by the forward filter
        self._alpha: np.ndarray | None = None
        self._last_seen = np.full(num_clients, -1)   # observed_only: round of each client's last known outcome
        self._powers: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ data
    def record(self, rnd: int, picked: Iterable[int], conflicted: Iterable[int]) -> None:
        """The outcome of round ``rnd`` for this server: the clients it picked and, of those, the
        ones with a conflict. Rounds must increase; a round never recorded means nothing picked."""
        if self.rounds and rnd <= self.rounds[-1]:
            raise ValueError(f"round {rnd} recorded after round {self.rounds[-1]}")
        row = np.full(self.n, NOT_PICKED, dtype=np.int64)
        row[list(picked)] = PICKED_OK
        conflicted = list(conflicted)
        if np.any(row[conflicted] == NOT_PICKED):
            raise ValueError(f"round {rnd}: a conflicted client was not picked")
        row[conflicted] = PICKED_CONFLICT
        self.rounds.append(rnd)
        self.rows.append(row)

    def _known(self, rnd: int) -> int:
        """How many recorded rows are known when selecting for round ``rnd`` (rounds <= rnd - lag)."""
        return int(np.searchsorted(self.rounds, rnd - self.settings.lag, side="right"))

    # ------------------------------------------------------------------ prediction
    def risks(self, rnd: int) -> np.ndarray:
        """p_i(rnd) for every client: the probability that picking it in round ``rnd`` ends in a conflict."""
        known = self._known(rnd)
        if known // self.settings.refit_every > self.fits:
            self._fit(known)
        if self.hmm is None:
            return self._empirical_rate(known)
        self._filter(known)
        B = self.hmm.emissionprob_
        if self.settings.coding == "three_symbol":
            if self._alpha is None:
                return self._empirical_rate(known)
            q = self._alpha @ self._power(rnd - self.rounds[known - 1])
            emit = q @ B
            picked = emit[:, PICKED_OK] + emit[:, PICKED_CONFLICT]
            return np.where(picked > 1e-12, emit[:, PICKED_CONFLICT] / np.maximum(picked, 1e-12), 0.0)
        q = np.stack([self._alpha[i] @ self._power(rnd - self._last_seen[i]) if self._last_seen[i] >= 0
                      else self.hmm.startprob_ for i in range(self.n)])
        return q @ B[:, CONFLICT]

    def _empirical_rate(self, known: int) -> np.ndarray:
        """Each client's known conflict share, shrunk toward the pooled share by one pick."""
        if not known:
            return np.zeros(self.n)
        rows = np.stack(self.rows[:known])
        picks, conflicts = np.sum(rows != NOT_PICKED, axis=0), np.sum(rows == PICKED_CONFLICT, axis=0)
        pooled = conflicts.sum() / picks.sum() if picks.sum() else 0.0
        return (conflicts + pooled) / (picks + 1)

    def _power(self, steps: int) -> np.ndarray:
        if steps not in self._powers:
            self._powers[steps] = np.linalg.matrix_power(self.hmm.transmat_, int(steps))
        return self._powers[steps]

    def _sequences(self, known: int) -> list[np.ndarray]:
        """Per client, its symbols in the coding's alphabet (clients with no pick are left out)."""
        rows = np.stack(self.rows[:known])
        seqs = []
        for i in range(self.n):
            col = rows[:, i]
            if not np.any(col != NOT_PICKED):
                continue
            seqs.append(col if self.settings.coding == "three_symbol" else col[col != NOT_PICKED] - 1)
        return seqs

    def _fit(self, known: int) -> None:
        from hmmlearn.hmm import CategoricalHMM

        logging.getLogger("hmmlearn").setLevel(logging.ERROR)  # "degenerate solution" warnings on short data
        self.fits = known // self.settings.refit_every
        seqs = self._sequences(known)
        if not seqs:
            return
        s = self.settings
        symbols = np.concatenate(seqs)
        hmm = CategoricalHMM(n_components=s.n_states, n_features=3 if s.coding == "three_symbol" else 2,
                             n_iter=s.n_iter, random_state=self.seed, init_params="", params="ste",
                             implementation="scaling", tol=1e-3)
        hmm.startprob_, hmm.transmat_, hmm.emissionprob_ = _initial_parameters(s, symbols)
        hmm.fit(symbols[:, None], lengths=[len(q) for q in seqs])
        self.hmm, self._powers = hmm, {}
        self._filtered, self._alpha = 0, None
        self._last_seen = np.full(self.n, -1)

    def _filter(self, known: int) -> None:
        """Advance the forward filter (normalized alpha per client) over rows [_filtered, known)."""
        A, B, pi = self.hmm.transmat_, self.hmm.emissionprob_, self.hmm.startprob_
        for j in range(self._filtered, known):
            row = self.rows[j]
            if self.settings.coding == "three_symbol":
                prior = np.tile(pi, (self.n, 1)) if self._alpha is None else self._alpha @ A
                self._alpha = _normalized(prior * B[:, row].T, prior)
                continue
            if self._alpha is None:
                self._alpha = np.tile(pi, (self.n, 1))
            rnd = self.rounds[j]
            for i in np.flatnonzero(row != NOT_PICKED):
                prior = pi if self._last_seen[i] < 0 else self._alpha[i] @ self._power(rnd - self._last_seen[i])
                self._alpha[i] = _normalized((prior * B[:, row[i] - 1])[None, :], prior[None, :])[0]
                self._last_seen[i] = rnd
        self._filtered = known


def _initial_parameters(settings: RiskSettings, symbols: np.ndarray):
    """Where Baum-Welch starts [R]: uniform pi, sticky A (0.9 on the diagonal), and states ordered
    by conflict propensity, P(conflict | picked) = 0.05 ... 0.9 across the K states; under
    three_symbol every state keeps the data's share of "not picked". hmmlearn's random start often
    ended in the symmetric fixed point where every state emits alike (risk = the pooled rate for
    every client); this start separates the states from the first iteration."""
    k = settings.n_states
    start = np.full(k, 1.0 / k)
    trans = np.full((k, k), 0.1 / max(k - 1, 1)) + np.eye(k) * (0.9 - 0.1 / max(k - 1, 1)) if k > 1 else np.ones((1, 1))
    conflict = np.linspace(0.05, 0.9, k) if k > 1 else np.array([0.3])
    if settings.coding == "observed_only":
        emit = np.stack([1 - conflict, conflict], axis=1)
    else:
        idle = float(np.clip(np.mean(symbols == NOT_PICKED), 0.05, 0.95))
        emit = np.stack([np.full(k, idle), (1 - idle) * (1 - conflict), (1 - idle) * conflict], axis=1)
    return start, trans, emit


def _normalized(alpha: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Rows of ``alpha`` scaled to sum 1; a row the model deems impossible (sum 0) keeps its prior."""
    total = alpha.sum(axis=1, keepdims=True)
    return np.where(total > 1e-300, alpha / np.maximum(total, 1e-300), fallback)
