"""Configuration of the SVD Serve app (configs/svd.yaml; `--set section.key=value`)."""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.config import param, section
from edgeray.errors import UserError
from serving.svd.model import DTYPES, SMOLLM2_GGUF


@dataclass
class ModelSection:
    """The served base model."""

    name: str = param("smollm2-135m", "model id clients send in `model` (tasks are listed beside it)")
    source: str = param(SMOLLM2_GGUF, "a .gguf file, a local HF checkpoint directory, or 'tiny-random'; "
                                      "relative paths are taken from the repo root")
    dtype: str = param("float32", "weights dtype (bfloat16 on a GPU)", choices=tuple(DTYPES))
    device: str = param("cpu", "torch device, e.g. cpu or cuda")
    seed: int = param(0, "init seed of the tiny-random model")


@dataclass
class SteeringSection:
    """Request defaults for the `svd` extension object."""

    alpha: float = param(0.1, "confidence-mask alpha when a request gives none (paper: 0.1)", gt=0, le=1)
    score_mask: str = param("zero", "POST /svd/score: masked entries left unsteered (zero) or removed (neg_inf)",
                            choices=("zero", "neg_inf"))


@dataclass
class ServeSection:
    """Ray Serve deployment, batching and request limits."""

    num_cpus: float = param(1.0, "Ray CPUs reserved by the replica (leave room for warm-start tasks)", ge=0)
    num_threads: int = param(2, "torch threads in the replica and in warm-start tasks", ge=1)
    max_batch_size: int = param(8, "rows (choices of all requests) in the continuous batch; more wait in "
                                       "arrival order and join at a decode-step boundary", ge=1, le=256)
    batch_wait_timeout_s: float = param(0.02, "an idle batcher waits this long for more requests before "
                                                 "its first prefill", ge=0)
    max_ongoing_requests: int = param(64, "requests a replica accepts at once", ge=1)
    default_max_tokens: int = param(64, "max_tokens when a request gives none", ge=1)
    max_tokens_limit: int = param(512, "largest max_tokens a request may ask for", ge=1)
    max_prompt_tokens: int = param(2048, "longest prompt, in tokens", ge=1)
    default_temperature: float = param(0.0, "temperature when a request gives none (0 = greedy, as in the paper)",
                                       ge=0)
    max_score_options: int = param(32, "most options one POST /svd/score may rank", ge=2)
    tasks_dir: str = param("runs/svd_tasks", "where tasks persist (adapter + mu_bar + task.json); "
                                            "relative paths are taken from the repo root")
    task_num_cpus: float = param(1.0, "Ray CPUs of one warm-start task", ge=0)
    task_placement: str = param("auto", "where warm starts run: ray_task, replica (a thread of the serving "
                                        "replica), or auto (a Ray task when the cluster has task_num_cpus free, "
                                        "else the replica)", choices=("auto", "ray_task", "replica"))
    min_task_examples: int = param(8, "fewest train examples POST /svd/tasks accepts", ge=2)
    max_task_examples: int = param(20000, "most train examples POST /svd/tasks accepts", ge=2)


@dataclass
class SVDServeConfig:
    """The SVD app: model, steering defaults, serving."""

    model: ModelSection = section(ModelSection)
    svd: SteeringSection = section(SteeringSection)
    serve: ServeSection = section(ServeSection)

    def validate(self) -> None:
        if self.serve.default_max_tokens > self.serve.max_tokens_limit:
            raise UserError(f"serve.default_max_tokens={self.serve.default_max_tokens} exceeds "
                            f"serve.max_tokens_limit={self.serve.max_tokens_limit}")
        if self.serve.min_task_examples > self.serve.max_task_examples:
            raise UserError("serve.min_task_examples must not exceed serve.max_task_examples")
