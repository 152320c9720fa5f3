"""LEED without Ray: the routing envs (PettingZoo API, both backends), network files, the prompt,
the parser and validator on malformed / partial / hallucinated answers, the three instruction
backends (an OpenAI-compatible HTTP server started here, a local transformers model, the
planner), the executor, the lambda schedule, the analysis, and bad input at the CLI."""

import json
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from edgeray.cli import main
from edgeray.config import load_config
from edgeray.errors import UserError
from rl.envs.road_graph import grid_graph, load_network, planar_graph
from rl.envs.routing import RoutingParallelEnv, place_trips
from rl.leed.config import LEEDConfig
from rl.leed.demonstrations import DemonstrationGenerator, execute_plans
from rl.leed.instructions import parse_instructions, validate
from rl.leed.llm import OpenAIChatClient, ShortestPathPlanner, TransformersClient, make_client, usable_backend
from rl.leed.prompt import Feedback, Scenario, build_prompts


def _cfg(**sections):
    return load_config(LEEDConfig, data=sections)


def _scenario(cfg=None):
    env = RoutingParallelEnv((cfg or _cfg()).env)
    return env, Scenario(env.graph, tuple(env.trips), tuple(env.possible_agents), 2.0, 5.0)


# ----------------------------------------------------------------------------- environments

@pytest.mark.parametrize("env_cfg", [
    {},                                                                  # 4x4 grid, 4 agents
    {"name": "planar", "planar_nodes": 25, "num_agents": 6},
    {"grid_rows": 8, "grid_cols": 8, "num_agents": 64, "max_steps": 80},  # scales to 64 agents
])
def test_graph_env_passes_the_parallel_api_test(env_cfg):
    env = RoutingParallelEnv(env_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the API test only warns about dead agents given data
        parallel_api_test(env, num_cycles=200)


def test_sumo_env_passes_the_parallel_api_test():
    try:
        import libsumo  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"libsumo cannot load here ({exc}); `pip install eclipse-sumo libsumo`")
    from rl.envs.routing_sumo import SumoRoutingParallelEnv

    env_cfg = {"backend": "sumo", "grid_rows": 3, "grid_cols": 3, "num_agents": 4, "min_trip_hops": 2}
    env = SumoRoutingParallelEnv(env_cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            parallel_api_test(env, num_cycles=100)
    finally:
        env.close()
    # the expert interface works on SUMO too: every vehicle reaches its goal on its shortest path
    generator = DemonstrationGenerator(_cfg(env=env_cfg, train={"num_env_runners": 1}), client=ShortestPathPlanner())
    try:
        result = generator.generate(0)
    finally:
        generator.env.close()
    assert all(result.arrived.values()) and result.report.valid_share == 1.0
    assert sum(len(a) for a in result.actions.values()) >= 4 * 2  # at least min_trip_hops decisions each


def test_congestion_slows_a_shared_road():
    env = RoutingParallelEnv({"grid_rows": 2, "grid_cols": 2, "num_agents": 1, "min_trip_hops": 1,
                              "capacity_per_lane": 1.0, "bpr_alpha": 1.0, "bpr_beta": 1.0})
    env.reset()
    free = env.free_time_s[0]
    env.load[env.graph.out_edges[env.trips[0].start][0]] = 3  # three vehicles already on the road
    env.step({"Agent_0": 0})
    assert env.remaining_s[0] + env.cfg.step_s == pytest.approx(free * (1 + 4.0))  # BPR with load 4 / capacity 1


def test_trips_are_seeded_and_distinct_and_too_many_agents_is_a_user_error():
    graph = grid_graph(3, 3)
    cfg = _cfg(env={"grid_rows": 3, "grid_cols": 3, "num_agents": 9}).env
    trips = place_trips(graph, cfg)
    assert trips == place_trips(graph, cfg) and len({t.start for t in trips}) == 9
    assert all(t.start != t.goal for t in trips)
    cfg.num_agents = 10
    with pytest.raises(UserError, match="more than the network can place"):
        place_trips(graph, cfg)


def test_network_files_load_and_bad_ones_are_user_errors(tmp_path):
    good = tmp_path / "net.json"
    good.write_text(json.dumps({"nodes": [["A", 0, 0], ["B", 100, 0], ["C", 100, 100]],
                                "edges": [["A", "B", 100, 1], ["B", "C"]], "bidirectional": True}))
    graph = load_network(good)
    assert graph.names == ("A", "B", "C") and len(graph.edges) == 4
    assert graph.shortest_path(0, 2) == [0, 1, 2]
    cases = {"bad.json": ('{"nodes": [["A", 0, 0]], "edges": [["A", "B"', "not valid JSON"),
             "ghost.json": ('{"nodes": [["A", 0, 0]], "edges": [["A", "Z", 5]]}', "'Z'"),
             "bad.net.xml": ("<net><junction id='a'", "not valid XML"),
             "other.net.xml": ("<routes/>", "not a SUMO network"),
             "net.txt": ("A B", "unknown format")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            load_network(tmp_path / name)


def test_planar_graph_is_connected_and_seeded():
    a, b = planar_graph(30, seed=3), planar_graph(30, seed=3)
    assert a.edges == b.edges
    assert (a.hops_from(0) >= 0).all()


# ----------------------------------------------------------------------------- prompt and parsing

def test_prompt_holds_adjacency_tasks_objectives_and_feedback():
    env, scenario = _scenario()
    prompt = build_prompts(scenario, "joint")[0]
    text = prompt.messages[1]["content"]
    assert "Intersection_0: Intersection_1 (200 m), Intersection_4 (200 m)" in text
    trip = env.trips[2]
    assert (f"Agent_2: start Intersection_{trip.start}, goal Intersection_{trip.goal}, "
            f"departs at step {trip.depart}") in text
    assert "travel time" in text and "MoveTo" in prompt.messages[0]["content"]
    assert len(build_prompts(scenario, "per_agent")) == 4
    refined = build_prompts(scenario, "joint", Feedback(0, {"Agent_0": -0.5}, {"Agent_0": 0.7}, [(0, 3, 1.5)]))[0]
    feedback = refined.messages[1]["content"]
    assert "Agent_0: own exploration -0.50, your previous plan 0.70" in feedback
    assert "Intersection_0 -> Intersection_1: 3, 1.5x" in feedback


def test_parser_reads_json_prose_unquoted_and_cut_off_answers():
    assert parse_instructions('[["MoveTo", "Intersection_1", "Agent_0"], ["Stop", "", "Agent_0"]]').triples == [
        ("MoveTo", "Intersection_1", "Agent_0"), ("Stop", "", "Agent_0")]
    prose = 'Sure! Here is the plan:\n```json\n[["MoveTo", "Intersection_1", "Agent_0"]]\n```\nGood luck.'
    assert parse_instructions(prose).triples == [("MoveTo", "Intersection_1", "Agent_0")]
    unquoted = parse_instructions("[MoveTo, Intersection_5, Agent_3] then [Wait, 2, Agent_3]")
    assert unquoted.triples == [("MoveTo", "Intersection_5", "Agent_3"), ("Wait", "2", "Agent_3")]
    cut = parse_instructions('[["MoveTo", "Intersection_1", "Agent_0"], ["MoveTo", "Intersection_2", "Ag')
    assert cut.triples == [("MoveTo", "Intersection_1", "Agent_0")] and cut.malformed == 1
    wrong_arity = parse_instructions('[["MoveTo", "Intersection_1"], ["Stop", "", "Agent_0"]]')
    assert wrong_arity.triples == [("Stop", "", "Agent_0")] and wrong_arity.malformed == 1
    assert parse_instructions("I cannot help with that.").triples == []


def test_validator_repairs_and_counts_every_problem():
    env, scenario = _scenario()
    start, goal = env.trips[0].start, env.trips[0].goal
    graph = env.graph
    neighbour = graph.edges[graph.out_edges[start][0]][1]
    text = json.dumps([
        ["MoveTo", f"Intersection_{neighbour}", "Agent_0"],   # valid, adjacent
        ["Fly", "Intersection_3", "Agent_0"],                 # unknown command
        ["MoveTo", "Intersection_99", "Agent_0"],             # hallucinated node
        ["MoveTo", "Intersection_1", "Agent_7"],              # unknown agent
        ["Wait", "soon", "Agent_0"],                          # bad parameter
        ["wait", "2", "agent 0"],                             # valid (lenient names)
        ["MoveTo", f"Intersection_{goal}", "Agent_0"],        # valid, expanded by shortest path
        ["Stop", "", "Agent_0"],
    ]) + ' ["MoveTo", "Inter'
    plans, report = validate(parse_instructions(text), scenario)
    assert report.unknown_command == report.hallucinated_node == report.unknown_agent == report.bad_parameter == 1
    assert report.valid == 4 and report.parsed == 8 and report.malformed == 0
    assert report.expanded_moves == (0 if graph.edge_between(neighbour, goal) is not None else 1)
    assert report.agents_without_instructions == 3 and report.agents_completed_by_shortest_path == 3
    assert report.valid_share == pytest.approx(4 / 8)
    moves = [v for kind, v in plans["Agent_0"].steps if kind == "move"]
    assert moves[0] == neighbour and moves[-1] == goal and ("wait", 2) in plans["Agent_0"].steps
    for agent, trip in zip(scenario.agents[1:], env.trips[1:]):   # completed by the shortest path
        assert [v for _, v in plans[agent].steps] == graph.shortest_path(trip.start, trip.goal)[1:]


def test_executing_planner_instructions_gives_demonstrations_that_reach_every_goal():
    env, scenario = _scenario()
    text = ShortestPathPlanner().generate(build_prompts(scenario, "joint"))[0]
    plans, report = validate(parse_instructions(text), scenario)
    assert report.valid_share == 1.0 and report.agents_completed_by_shortest_path == 0
    obs, actions, returns, arrived = execute_plans(env, plans)
    assert all(arrived.values())
    for agent, trip in zip(scenario.agents, env.trips):
        hops = len(env.graph.shortest_path(trip.start, trip.goal)) - 1
        assert len(actions[agent]) == hops and obs[agent].shape == (hops, env.observation_space(agent).shape[0])
        assert returns[agent] > 0  # arrival bonus 1 minus under one step-penalty per step


def test_decision_steps_only_keeps_the_steps_whose_action_moved_the_vehicle():
    env, scenario = _scenario()
    plans, _ = validate(parse_instructions(ShortestPathPlanner().generate(build_prompts(scenario, "joint"))[0]), scenario)
    _, decisions, _, _ = execute_plans(env, plans, decision_steps_only=True)
    _, every_step, _, _ = execute_plans(env, plans, decision_steps_only=False)
    for agent in scenario.agents:
        assert len(every_step[agent]) > len(decisions[agent])
        assert (decisions[agent] != env.wait_action).all()  # a planner never waits at an intersection
        waits = every_step[agent] == env.wait_action          # transit and pre-departure steps
        assert np.array_equal(every_step[agent][~waits], decisions[agent])


def test_a_detour_planner_is_a_valid_but_worse_expert():
    """llm.planner_detour_share: routes via a random intersection are valid paths from start to
    goal without loops, longer than the shortest, and their demonstrations earn less."""
    env, scenario = _scenario()
    prompts = build_prompts(scenario, "joint")
    optimal = validate(parse_instructions(ShortestPathPlanner().generate(prompts)[0]), scenario)[0]
    detour = validate(parse_instructions(ShortestPathPlanner(detour_share=1.0, seed=3).generate(prompts)[0]),
                      scenario)[0]
    longer = 0
    for agent, trip in zip(scenario.agents, env.trips):
        nodes = [trip.start] + [v for _, v in detour[agent].steps]
        assert nodes[-1] == trip.goal and len(set(nodes)) == len(nodes)
        assert all(env.graph.edge_between(u, v) is not None for u, v in zip(nodes, nodes[1:]))
        longer += len(nodes) - 1 > len(optimal[agent].steps)
    assert longer >= 1
    assert ShortestPathPlanner(detour_share=0.0).generate(prompts) == ShortestPathPlanner().generate(prompts)
    best = sum(execute_plans(_scenario()[0], optimal)[2].values())
    worse = sum(execute_plans(_scenario()[0], detour)[2].values())
    assert worse < best
    with pytest.raises(UserError, match="planner_detour_share"):
        ShortestPathPlanner(detour_share=1.5)


def test_planner_refinement_routes_around_congested_roads():
    env, scenario = _scenario(_cfg(env={"num_agents": 1}))
    trip = env.trips[0]
    first = json.loads(ShortestPathPlanner().generate(build_prompts(scenario, "joint"))[0])
    first_road = env.graph.edge_between(trip.start, env.graph.node(first[0][1]))
    feedback = Feedback(0, congested_roads=[(first_road, 5, 5.0)])
    second = json.loads(ShortestPathPlanner().generate(build_prompts(scenario, "joint", feedback))[0])
    assert second[0][1] != first[0][1] and second[-2][1] == first[-2][1] == f"Intersection_{trip.goal}"


# ----------------------------------------------------------------------------- LLM backends

class _OpenAIHandler(BaseHTTPRequestHandler):
    """The OpenAI chat protocol: records each request, answers with `server.answer`."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        payload = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": self.server.answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def openai_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIHandler)
    server.requests, server.answer = [], ""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_backend_speaks_the_openai_chat_protocol(openai_server, monkeypatch):
    env, scenario = _scenario()
    monkeypatch.setenv("LEED_TEST_KEY", "secret")
    cfg = _cfg(llm={"backend": "http", "url": f"http://127.0.0.1:{openai_server.server_port}/v1",
                    "model": "smollm2-135m", "api_key_env": "LEED_TEST_KEY", "fallback": "error"})
    # what an LLM answers: prose, then a plan with one hallucinated intersection
    openai_server.answer = ("Here you go:\n" + json.dumps(
        [["MoveTo", "Intersection_77", "Agent_0"]]
        + json.loads(ShortestPathPlanner().generate(build_prompts(scenario, "joint"))[0])))
    generator = DemonstrationGenerator(cfg, client=make_client(cfg.llm))
    demos = generator.generate(0)
    path, headers, body = openai_server.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer secret"
    assert body["model"] == "smollm2-135m" and [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["max_tokens"] == cfg.llm.max_new_tokens and body["temperature"] == 0.0
    assert demos.backend == "http" and demos.report.hallucinated_node == 1
    assert demos.report.valid == demos.report.parsed - 1 and all(demos.arrived.values())


def test_unreachable_endpoint_names_the_url_or_falls_back_with_a_warning(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = _cfg(llm={"backend": "http", "url": f"http://127.0.0.1:{port}/v1", "fallback": "error"})
    with pytest.raises(UserError, match=f"http://127.0.0.1:{port}/v1/chat/completions is unreachable"):
        usable_backend(cfg.llm)
    cfg.llm.fallback = "planner"
    assert usable_backend(cfg.llm) == "planner"
    assert f"127.0.0.1:{port}" in caplog.text and "not an LLM" in caplog.text
    assert isinstance(make_client(cfg.llm), ShortestPathPlanner)


def test_a_silent_endpoint_times_out_instead_of_hanging():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        client = OpenAIChatClient(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "m", timeout_s=0.5,
                                  max_new_tokens=8, temperature=0.0)
        t0 = time.monotonic()
        with pytest.raises(UserError, match="unreachable.*timeout 0.5 s"):
            client.chat([{"role": "user", "content": "hi"}])
        assert time.monotonic() - t0 < 5
    finally:
        listener.close()


def test_transformers_backend_generates_from_a_local_model():
    _, scenario = _scenario()
    client = TransformersClient("tiny-random", max_new_tokens=12, temperature=0.0, answer_prefix='[["')
    prompts = build_prompts(scenario, "per_agent")
    answers = client.generate(prompts)
    assert len(answers) == 4 and all(a.startswith('[["') for a in answers)
    assert answers == client.generate(prompts)  # greedy: reproducible
    plans, report = validate(parse_instructions(answers[0]), scenario, prompts[0].agents)
    assert report.agents_completed_by_shortest_path == 1 and list(plans) == ["Agent_0"]


def test_missing_local_model_is_named(tmp_path):
    cfg = _cfg(llm={"backend": "transformers", "model_path": str(tmp_path / "nope.gguf"), "fallback": "error"})
    with pytest.raises(UserError, match="no local model at .*nope.gguf"):
        usable_backend(cfg.llm)


# ----------------------------------------------------------------------------- schedule, analysis, CLI

def test_expert_weight_schedules():
    from rl.leed.learners import expert_weight

    assert [round(expert_weight(k, 1.0, "exponential", 0.9, 10, 0.0), 4) for k in range(3)] == [1.0, 0.9, 0.81]
    assert expert_weight(100, 1.0, "exponential", 0.9, 10, 0.05) == 0.05
    assert [expert_weight(k, 1.0, "linear", 0.9, 4, 0.2) for k in (0, 2, 4, 9)] == [1.0, 0.6, 0.2, 0.2]
    assert expert_weight(50, 0.5, "constant", 0.9, 4, 0.0) == 0.5


def test_analysis_measures_steps_to_ippos_final_return():
    from rl.leed.analysis import markdown_table, summarize

    cfg = _cfg()
    ippo = [{"env_steps": 100 * i, "episode_return_mean": r, "iteration_wall_s": 1.0}
            for i, r in enumerate([0, 1, 2, 3, 3, 3], 1)]
    leed = [{"env_steps": 100 * i, "episode_return_mean": r, "iteration_wall_s": 2.0,
             "leed": {"valid_share": 0.5, "expert_episode_return": 3.4, "backend": "planner"}}
            for i, r in enumerate([2, 3, 3.2, 3.3, 3.3, 3.3], 1)]
    summary = summarize([("ippo", cfg, ippo), ("leed", cfg, leed)])["grid-4"]
    assert summary["target_return"] == 3.0
    assert summary["methods"]["ippo"]["steps_to_target"] == 400 and summary["methods"]["leed"]["steps_to_target"] == 200
    assert summary["methods"]["leed"]["steps_ratio_vs_ippo"] == 0.5
    assert summary["methods"]["leed"]["valid_instruction_share"] == 0.5
    assert "| grid-4 | leed | 1 | 3.30 | 200 | 0.50 |" in markdown_table({"grid-4": summary})


def test_analysis_pairs_each_seed_with_ippos_run_of_that_seed():
    from rl.leed.analysis import summarize

    def run(method, seed, returns):
        return method, _cfg(train={"seed": seed}), [{"env_steps": 100 * i, "episode_return_mean": r,
                                                     "iteration_wall_s": 1.0} for i, r in enumerate(returns, 1)]

    runs = [run("ippo", 0, [0, 1, 2, 3, 3, 3]), run("leed", 0, [2, 3, 3, 3, 3, 3]),       # 200 / 400
            run("ippo", 1, [0, 0, 0, 1, 5, 5]), run("leed", 1, [1, 5, 5, 5, 5, 6]),       # 200 / 500
            run("ippo", 2, [0, 0, 0, 0, 0, 9]), run("leed", 2, [1, 1, 1, 1, 1, 1])]       # never / 600
    leed = summarize(runs)["grid-4"]["methods"]["leed"]
    assert leed["steps_ratio_vs_ippo_per_seed"] == {0: 0.5, 1: 0.4, 2: None}
    assert leed["steps_ratio_vs_ippo_paired_mean"] == pytest.approx(0.45)
    low, high = leed["steps_ratio_vs_ippo_ci"]
    assert 0.4 <= low <= 0.45 <= high <= 0.5
    # final returns (last 3 iterations): seed 0 3 vs 3, seed 1 16/3 vs 11/3, seed 2 1 vs 3
    assert leed["final_return_minus_ippo"] == pytest.approx((0 + 5 / 3 - 2) / 3)
    assert leed["final_return_minus_ippo_ci"][0] < leed["final_return_minus_ippo"] < leed["final_return_minus_ippo_ci"][1]
    # 90 % of IPPO's improvement: seed 0 first 0, final 3 -> 2.7: leed 200 / ippo 400; seed 1 0 -> 5:
    # 4.5: 200 / 500; seed 2 0 -> 3: 2.7: never / 600
    assert leed["steps_ratio_vs_ippo_90pct_per_seed"] == {0: 0.5, 1: 0.4, 2: None}
    runs[1] = run("leed", 0, [1, 2, 2.8, 2.9, 3, 3])   # crosses 2.7 at 300, reaches 3 only at 500
    leed = summarize(runs)["grid-4"]["methods"]["leed"]
    assert leed["steps_ratio_vs_ippo_per_seed"][0] == 1.25 and leed["steps_ratio_vs_ippo_90pct_per_seed"][0] == 0.75


@pytest.mark.parametrize("argv, message", [
    (["--set", "env.num_agents=17"], "env.num_agents=17 is more than the network can place: 16 start intersections"),
    (["--set", "env.name=file", "--set", "env.network_file={bad}"], "is not valid JSON"),
    (["--set", "env.name=file"], "env.name=file needs env.network_file"),
    (["--set", "llm.backend=http", "--set", "llm.url=http://127.0.0.1:{port}/v1", "--set", "llm.fallback=error"],
     "LLM endpoint http://127.0.0.1:{port}/v1/chat/completions is unreachable"),
    (["--set", "llm.backend=gpt"], "llm.backend='gpt' is not allowed"),
    (["--set", "expert.decay=0"], "expert.decay=0.0 is out of range"),
    (["--set", "env.backend=sumo"], "env.backend=sumo needs train.num_env_runners >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [["A", 0, 0]], "edges": [["A", "B"')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs_root = tmp_path / "runs"
    argv = [a.format(bad=bad, port=port) for a in argv]
    code = main(["rl", "train", "leed", "--config", "configs/leed.yaml", "--runs-root", str(runs_root), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgeray: error: ") and err.count("\n") == 1, err
    assert message.format(port=port) in err
    assert not runs_root.exists()  # failed before Ray and before a run directory


def test_demonstrations_map_to_modules():
    cfg = _cfg(env={"num_agents": 3})
    demos = DemonstrationGenerator(cfg).generate(0)
    from rl.leed.algorithms import module_of

    per_agent = demos.for_modules(module_of(cfg))
    assert sorted(per_agent) == ["Agent_0", "Agent_1", "Agent_2"]
    cfg.policy.sharing = "shared"
    shared = demos.for_modules(module_of(cfg))
    assert list(shared) == ["shared"]
    assert len(shared["shared"][1]) == sum(len(a) for _, a in per_agent.values())
    assert np.array_equal(shared["shared"][0][: len(per_agent["Agent_0"][1])], per_agent["Agent_0"][0])
