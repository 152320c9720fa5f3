"""Where LEED's instructions come from: three backends behind one `generate(prompts) -> texts`.

  * `OpenAIChatClient`   any OpenAI-compatible chat endpoint over real HTTP (POST
                         {url}/chat/completions), this project's own `edgeray serve svd` included;
                         every request has a timeout and every failure names the URL;
  * `TransformersClient` a local causal LM from a path (default SmolLM2-135M-Instruct, loaded by
                         `edgeray.hf_models`, never through serving/); prompts are decoded as one
                         left-padded batch;
  * `ShortestPathPlanner` NOT AN LLM: the fallback that writes the same `[Command, Parameter,
                         AgentID]` JSON from shortest paths (on refinement rounds it routes around
                         the reported congested roads and the roads it already gave earlier agents).
                         `detour_share` > 0 makes it an imperfect expert [R]: that share of the
                         agents is sent via a random intermediate intersection (valid but longer
                         routes, as an LLM's plausible detours are), so LEED's decaying expert
                         weight can be compared with cloning when the demonstrations are not optimal.
The paper uses GPT-3.5 [P]; the two LLM backends and the planner are our reconstruction [R] for
machines that reach no LLM service (notes A3 step 7).

`usable_backend(llm_cfg)` checks the backend once (a probe request / the model files); with
`llm.fallback: planner` an unreachable endpoint or a missing model logs a warning and the planner
takes over, with `error` it stops with a one-line UserError naming the URL or path.
`make_client(llm_cfg)` builds the client of the backend it settles on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from edgeray.errors import UserError
from rl.leed.prompt import Prompt

log = logging.getLogger("edgeray.leed")


class ShortestPathPlanner:
    """The non-LLM fallback: shortest paths (by free-flow time, inflated on congested roads) as
    `[MoveTo, node, agent]` instructions; each agent's route adds load that later agents avoid."""

    name = "planner"
    congestion_penalty = 1.0   # a congested road costs (1 + penalty * times-capacity) x its free-flow time [R]
    shared_road_penalty = 0.5  # and each agent already routed over a road adds this share of its time [R]

    def __init__(self, detour_share: float = 0.0, seed: int = 0):
        if not 0.0 <= detour_share <= 1.0:
            raise UserError(f"llm.planner_detour_share must be in [0, 1], got {detour_share}")
        self.detour_share = detour_share
        self.rng = np.random.default_rng(seed)

    def generate(self, prompts: list[Prompt]) -> list[str]:
        return [self._plan(p) for p in prompts]

    def _route(self, graph, start: int, goal: int, weights: np.ndarray) -> list[int]:
        if self.detour_share == 0.0 or self.rng.random() >= self.detour_share:
            return graph.shortest_path(start, goal, weights)
        via = int(self.rng.choice([v for v in range(len(graph.names)) if v not in (start, goal)]))
        first, second = graph.shortest_path(start, via, weights), graph.shortest_path(via, goal, weights)
        if not first or not second:                  # the detour node is not on any way to the goal
            return graph.shortest_path(start, goal, weights)
        route = []
        for v in first + second[1:]:                  # a loop through the detour is cut at its first return
            if v in route:
                del route[route.index(v) + 1:]
            else:
                route.append(v)
        return route

    def _plan(self, prompt: Prompt) -> str:
        scenario, graph = prompt.scenario, prompt.scenario.graph
        weights = graph.lengths.astype(float).copy()
        if prompt.feedback is not None:
            for e, _, ratio in prompt.feedback.congested_roads:
                weights[e] *= 1.0 + self.congestion_penalty * ratio
        index = {a: i for i, a in enumerate(scenario.agents)}
        routed = np.zeros(len(graph.edges))
        items = []
        for agent in prompt.agents:
            trip = scenario.trips[index[agent]]
            path = self._route(graph, trip.start, trip.goal, weights * (1.0 + self.shared_road_penalty * routed))
            for u, v in zip(path, path[1:]):
                routed[graph.edge_between(u, v)] += 1
                items.append(["MoveTo", graph.names[v], agent])
            items.append(["Stop", "", agent])
        return json.dumps(items)


class OpenAIChatClient:
    """POST {url}/chat/completions with {"model", "messages", "max_tokens", "temperature"}."""

    name = "http"

    def __init__(self, url: str, model: str, timeout_s: float, max_new_tokens: int, temperature: float,
                 api_key: str | None = None):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s = model, timeout_s
        self.max_new_tokens, self.temperature, self.api_key = max_new_tokens, temperature, api_key

    def generate(self, prompts: list[Prompt]) -> list[str]:
        return [self.chat(list(p.messages)) for p in prompts]

    def chat(self, messages: list[dict], max_tokens: int | None = None) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens or self.max_new_tokens,
                "temperature": self.temperature}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:200]
            raise UserError(f"LLM endpoint {self.endpoint} answered HTTP {exc.code} {exc.reason}: "
                            f"{' '.join(detail.split())}") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"LLM endpoint {self.endpoint} is unreachable ({reason}; timeout {self.timeout_s:g} s); "
                            f"start it (e.g. `edgeray serve svd`), fix llm.url, or set llm.backend=planner") from None
        except json.JSONDecodeError:
            raise UserError(f"LLM endpoint {self.endpoint} did not answer JSON; "
                            f"is it an OpenAI-compatible API?") from None
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"LLM endpoint {self.endpoint} answered without choices[0].message.content; "
                            f"is it an OpenAI-compatible chat API?") from None


class TransformersClient:
    """A local causal LM (chat template, greedy unless temperature > 0), prompts in one batch."""

    name = "transformers"

    def __init__(self, model_path: str, max_new_tokens: int, temperature: float, threads: int = 2, seed: int = 0,
                 answer_prefix: str = ""):
        from edgeray.hf_models import load_model, resolve_source

        self.source = resolve_source(model_path)
        self.model, self.tokenizer = load_model(self.source, seed=seed)
        self.max_new_tokens, self.temperature, self.threads, self.seed = max_new_tokens, temperature, threads, seed
        self.answer_prefix = answer_prefix

    def generate(self, prompts: list[Prompt]) -> list[str]:
        import torch

        texts = [self.tokenizer.apply_chat_template(list(p.messages), tokenize=False, add_generation_prompt=True)
                 + self.answer_prefix for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            torch.manual_seed(self.seed)
            with torch.no_grad():
                out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens,
                                          do_sample=self.temperature > 0, temperature=self.temperature or None,
                                          top_p=None, top_k=None, pad_token_id=self.tokenizer.pad_token_id)
        finally:
            torch.set_num_threads(before)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return [self.answer_prefix + text for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _http_client(llm) -> OpenAIChatClient:
    api_key = os.environ.get(llm.api_key_env) if llm.api_key_env else None
    return OpenAIChatClient(llm.url, llm.model, llm.timeout_s, llm.max_new_tokens, llm.temperature, api_key)


def _check_model_files(model_path: str) -> None:
    from edgeray.hf_models import TINY, resolve_source

    source = resolve_source(model_path)
    path = Path(source)
    if source == TINY or (path / "config.json").is_file():
        return
    if path.suffix == ".gguf" and (path.is_file() or (path.parent / "hf" / "config.json").is_file()):
        return
    raise UserError(f"no local model at {path} (llm.model_path): give a .gguf file, an HF checkpoint directory "
                    f"or 'tiny-random'; SmolLM2 is fetched by `bash scripts/assets/svd.sh`")


def usable_backend(llm) -> str:
    """`llm.backend` when its endpoint answers a probe (http) or its model files exist
    (transformers); otherwise "planner" with a warning (llm.fallback=planner) or a UserError
    naming the URL / path (llm.fallback=error). Never waits longer than llm.timeout_s."""
    try:
        if llm.backend == "http":
            _http_client(llm).chat([{"role": "user", "content": "Reply with OK."}], max_tokens=2)
        elif llm.backend == "transformers":
            _check_model_files(llm.model_path)
        return llm.backend
    except UserError as exc:
        if llm.fallback == "error":
            raise
        log.warning("%s -- using the shortest-path planner (not an LLM) instead (llm.fallback=planner)", exc)
        return "planner"


def make_client(llm, seed: int = 0):
    """The client of the backend `usable_backend` settles on."""
    backend = usable_backend(llm)
    if backend == "http":
        return _http_client(llm)
    if backend == "transformers":
        return TransformersClient(llm.model_path, llm.max_new_tokens, llm.temperature, llm.threads, seed,
                                  llm.answer_prefix)
    return ShortestPathPlanner(llm.planner_detour_share, seed)
