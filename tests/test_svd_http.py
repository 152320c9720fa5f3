"""SVD over HTTP against a real Ray Serve instance (tiny random model): the official `openai`
client, SSE streaming, task registration + warm-start as a Ray task, persistence across a
redeploy, scoring, concurrency, and OpenAI-style 4xx errors for bad input."""

import concurrent.futures
import time

import httpx
import pytest

pytestmark = pytest.mark.ray

APP, PREFIX = "svdtest", "/svdtest"
MODEL = "tiny"


def _deploy(tasks_dir):
    from ray import serve

    from serving.svd.app import app_builder

    app = app_builder({"model.name": MODEL, "model.source": "tiny-random", "serve.tasks_dir": str(tasks_dir),
                       "serve.num_cpus": 0, "serve.task_num_cpus": 1, "serve.max_tokens_limit": 64,
                       "serve.default_max_tokens": 8, "serve.min_task_examples": 8})
    serve.run(app, name=APP, route_prefix=PREFIX)


@pytest.fixture(scope="module")
def svd_url(serve_url, tmp_path_factory):
    from ray import serve

    tasks_dir = tmp_path_factory.mktemp("svd_tasks")
    _deploy(tasks_dir)
    yield serve_url + PREFIX, tasks_dir
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(svd_url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=svd_url[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _examples(n=24):
    return [{"prompt": f"Is {k} odd or even? Answer:", "target": " odd" if k % 2 else " even"} for k in range(n)]


@pytest.fixture(scope="module")
def ready_task(svd_url):
    url = svd_url[0]
    body = {"name": "parity", "peft": {"type": "lora", "r": 4, "alpha": 8}, "train": _examples(),
            "calib_frac": 0.25, "batch_size": 8, "epochs": 2, "lr": 0.01}
    resp = httpx.post(url + "/svd/tasks", json=body, timeout=30)
    assert resp.status_code == 202, resp.text
    status_url = resp.json()["status_url"]
    assert resp.headers["location"] == status_url
    deadline = time.time() + 120
    while time.time() < deadline:
        record = httpx.get(status_url, timeout=30).json()
        if record["status"] in ("ready", "failed"):
            break
        time.sleep(0.5)
    assert record["status"] == "ready", record
    return record


def test_models_and_completion_with_openai_client(client):
    assert [m.id for m in client.models.list().data][0] == MODEL
    resp = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0)
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 5 and resp.usage.prompt_tokens == len("Hello there")
    again = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0)
    assert again.choices[0].text == resp.choices[0].text      # greedy is deterministic


def test_streaming_equals_non_streaming(client):
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    text_chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in text_chunks) == client.completions.create(
        model=MODEL, prompt="abc", max_tokens=4, temperature=0).choices[0].text


def test_task_warm_start_and_steered_generation(client, svd_url, ready_task):
    assert ready_task["n_calib_tokens"] > 0 and ready_task["mu_bar"] == ready_task["mu_ratio"]
    assert "parity" in [m.id for m in client.models.list().data]
    steered = client.completions.create(model="parity", prompt="Is 7 odd or even? Answer:", max_tokens=4,
                                        temperature=0)
    svd = steered.model_extra["svd"]
    assert svd["task"] == "parity" and svd["enabled"] and svd["mu"] == pytest.approx(ready_task["mu_bar"])
    assert svd["mean_masked_vocab"] >= 0
    forced = client.completions.create(model=MODEL, prompt="Is 7 odd or even? Answer:", max_tokens=4, temperature=0,
                                       extra_body={"svd": {"task": "parity", "mu": -3.0, "alpha": 0.5}})
    assert forced.model_extra["svd"]["mu"] == -3.0 and forced.model_extra["svd"]["alpha"] == 0.5
    chunks = list(client.chat.completions.create(model="parity", messages=[{"role": "user", "content": "Is 3 odd?"}],
                                                 max_tokens=4, temperature=0.7, top_p=0.9, seed=1, stream=True))
    assert chunks[-1].model_extra["svd"]["task"] == "parity"


def test_score_endpoint(svd_url, ready_task):
    url = svd_url[0]
    body = {"task": "parity", "prompt": "Is 9 odd or even? Answer:", "options": [" odd", " even"]}
    steered = httpx.post(url + "/svd/score", json=body, timeout=30).json()
    plain = httpx.post(url + "/svd/score", json={**body, "steer": False}, timeout=30).json()
    assert steered["mu"] == pytest.approx(ready_task["mu_bar"]) and plain["mu"] == 0.0
    assert len(steered["scores"]) == 2 and steered["best"] in (0, 1)
    assert all(s <= 0 for s in plain["scores"])
    removed = httpx.post(url + "/svd/score", json={**body, "mask": "neg_inf", "alpha": 1.0}, timeout=30).json()
    assert removed["scores"].count(None) >= 1       # alpha = 1 keeps only the argmax token


def test_task_survives_redeploy(svd_url, ready_task):
    _deploy(svd_url[1])                              # a new replica: the task comes back from disk
    resp = httpx.post(svd_url[0] + "/v1/completions", timeout=60,
                      json={"model": "parity", "prompt": "Is 4 odd or even? Answer:", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert resp.json()["svd"]["mu"] == pytest.approx(ready_task["mu_bar"])


def test_concurrent_requests_wait_at_most_one_batch(svd_url):
    url = svd_url[0] + "/v1/completions"

    def one(i, max_tokens):
        started = time.time()
        resp = httpx.post(url, json={"model": MODEL, "prompt": f"request {i}", "max_tokens": max_tokens,
                                     "svd": None}, timeout=60)
        return resp.status_code, time.time() - started

    _, short_alone = one(99, 16)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6), [64] + [16] * 5))
    assert all(code == 200 for code, _ in results)
    long_latency = results[0][1]
    # a short request shares the long one's batch or waits for it, never for more than that
    assert max(latency for _, latency in results[1:]) <= long_latency + 3 * short_alone + 2.0


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "svd": {"task": "nope"}}, 404, "task"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "svd": {"enabled": True}}, 400, "svd.task"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 3}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/svd/tasks", {"train": _examples(3)}, 400, None),
    ("/svd/tasks", {"train": _examples(), "peft": {"type": "bitfit"}}, 400, None),
    ("/svd/tasks", {"train": _examples(), "base_model": "gpt-9"}, 404, "base_model"),
    ("/svd/tasks", {"train": [{"prompt": "x"}] * 10}, 400, None),
    ("/svd/score", {"prompt": "x", "options": [" a"], "steer": False}, 400, "options"),
])
def test_bad_input_is_a_4xx_openai_error(svd_url, path, body, status, param):
    resp = httpx.post(svd_url[0] + path, json=body, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_malformed_json_and_unknown_task_status(svd_url, client):
    import openai

    resp = httpx.post(svd_url[0] + "/v1/completions", content=b"{not json", timeout=30,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    assert httpx.get(svd_url[0] + "/svd/tasks/missing", timeout=30).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
