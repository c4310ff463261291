"""The Keras backend choice (train.backend / a worker's KERAS_BACKEND), precision on GPUs, and
`fer worker`'s device check. The JAX case runs the real pipeline: `dvc repro` of train + evaluate
in a temp git + DVC project, a crash and a resume, MLflow tracking, then `fer evaluate` on JAX."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fer_pipeline import params as P
from fer_pipeline.backend import Device, requested, select
from fer_pipeline.errors import FerError, ParamsError
from fer_pipeline.train.precision import auto_policy
from sandbox import make_project

BIN = Path(sys.executable).parent
H200, A100 = Device("gpu", "NVIDIA H200", (9, 0)), Device("gpu", "NVIDIA A100", (8, 0))
V100, T4 = Device("gpu", "Tesla V100", (7, 0)), Device("gpu", "Tesla T4", (7, 5))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("KERAS_BACKEND", "MLFLOW_TRACKING_URI", "FER_TRAIN_PRECISION")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", **extra}


def test_auto_precision_policy_on_cpus_and_gpus():
    assert auto_policy(flags={"amx_bf16"}, gpu_devices=[]) == "mixed_bfloat16"
    assert auto_policy(flags={"avx512_bf16"}, gpu_devices=[]) == "mixed_bfloat16"
    assert auto_policy(flags={"avx2"}, gpu_devices=[]) == "float32"
    assert auto_policy(flags=set(), gpu_devices=[H200]) == "mixed_bfloat16"
    assert auto_policy(flags=set(), gpu_devices=[A100, H200]) == "mixed_bfloat16"
    assert auto_policy(flags=set(), gpu_devices=[V100]) == "mixed_float16"
    assert auto_policy(flags=set(), gpu_devices=[T4]) == "mixed_float16"
    # One older GPU among them: fp16, which every one of them runs.
    assert auto_policy(flags={"amx_bf16"}, gpu_devices=[A100, T4]) == "mixed_float16"
    assert auto_policy(flags=set(), gpu_devices=[Device("gpu", "unknown")]) == "mixed_float16"


def test_backend_comes_from_the_worker_env_else_the_param(monkeypatch):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert requested("jax") == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    assert requested("jax") == "tensorflow"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    with pytest.raises(FerError, match="KERAS_BACKEND=torch: unsupported"):
        requested("tensorflow")
    with pytest.raises(ParamsError, match="backend"):
        P.from_dict({"train": {"backend": "torch"}})


def test_a_second_backend_in_one_process_is_refused(monkeypatch):
    import keras

    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    other = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"
    with pytest.raises(FerError, match=f"start it with KERAS_BACKEND={other}"):
        select(other)
    assert select(keras.backend.backend()) == keras.backend.backend()


def _gpu_seen_by_jax() -> bool:
    import jax

    return any(d.platform != "cpu" for d in jax.devices())


def test_gpu_worker_refuses_to_start_without_a_gpu(tmp_path):
    pytest.importorskip("jax")
    if _gpu_seen_by_jax():
        pytest.skip("this machine has a GPU: nothing to refuse")
    res = subprocess.run([str(BIN / "fer"), "worker", "--pool", "gpu"], cwd=tmp_path,
                         env=_env(KERAS_BACKEND="jax"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "the jax backend sees no GPU here (it sees: cpu" in res.stderr
    assert "--allow-no-gpu" in res.stderr and "Traceback" not in res.stderr


def test_gpu_worker_without_a_gpu_starts_when_allowed(tmp_path):
    """Allowed: it states its devices and becomes a real `prefect worker` (no server needed to
    start; killed once it says it started)."""
    pytest.importorskip("jax")
    proc = subprocess.Popen([str(BIN / "fer"), "worker", "--pool", "gpu", "--queue", "train"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env=_env(KERAS_BACKEND="jax", FER_WORKER_ALLOW_NO_GPU="1",
                                     PREFECT_API_URL="http://127.0.0.1:9/api"))
    lines: list[str] = []
    deadline = time.time() + 120
    try:
        for line in proc.stdout:
            lines.append(line)
            if "started!" in line or time.time() > deadline:
                break
    finally:
        # A started worker is all this test needs; against no server its graceful shutdown
        # retries the events API for about a minute, so it is killed (with its process group).
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    out = "".join(lines)
    assert "fer worker: pool gpu, Keras backend jax, devices: cpu" in out
    assert "worker start --pool gpu --type process --work-queue train" in out
    assert "Worker 'ProcessWorker" in out and "started!" in out, out[-2000:]


def _repro(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), "repro", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_train_and_evaluate_on_jax_through_dvc_with_resume(tmp_path):
    """train.backend: jax, no KERAS_BACKEND in the environment: `dvc repro` trains on JAX
    (killed after epoch 1, resumed, one MLflow run), evaluate reads the JAX-trained file; then
    `fer evaluate` on JAX gives the same test accuracy as on TensorFlow."""
    pytest.importorskip("jax")
    from mlflow.tracking import MlflowClient

    repo = make_project(tmp_path, n_models=1, per_class={"train": 10, "test": 4})
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (name,) = params["models"]
    params["train"]["backend"] = "jax"
    params["models"][name].update({"epochs": 4, "early_stopping_patience": 5})
    params["mlflow"]["log_model"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    from crash import kill_after_epochs

    killed = kill_after_epochs([str(BIN / "dvc"), "repro"], repo / ".cache/train" / name /
                               "history.csv", 2, cwd=repo, env=_env())
    assert 2 <= killed.epochs < 4, killed.output[-3000:]
    run_id = json.loads((repo / ".cache/train" / name / "mlflow_run.json").read_text())["run_id"]

    done = _repro(repo, _env())
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert f"resuming from epoch {killed.epochs + 1}" in out or \
        f"resuming from epoch {killed.epochs}" in out
    assert "Keras backend: tensorflow" in out          # evaluate: no env, the default backend
    metrics = json.loads((repo / "reports/train" / name / "metrics.json").read_text())
    assert metrics["epochs_run"] == 4
    side = json.loads((repo / "reports/train" / name / "mlflow.json").read_text())
    assert side["run_id"] == run_id                    # the interrupted run was continued
    client = MlflowClient(params["mlflow"]["tracking_uri"])
    run = client.get_run(run_id)
    assert run.data.params["backend"] == "jax" and run.info.status == "FINISHED"
    assert "up to date" in subprocess.run([str(BIN / "dvc"), "status"], cwd=repo, env=_env(),
                                          capture_output=True, text=True).stdout
    tf_eval = json.loads((repo / "reports/evaluate/metrics.json").read_text())

    jax = subprocess.run([str(BIN / "fer"), "evaluate", "--no-register"], cwd=repo,
                         env=_env(KERAS_BACKEND="jax"), capture_output=True, text=True,
                         timeout=600)
    assert jax.returncode == 0, jax.stderr[-4000:]
    assert "Keras backend: jax" in jax.stderr
    jax_eval = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    n_test = 4 * 7
    assert abs(jax_eval[name]["test_accuracy"] - tf_eval[name]["test_accuracy"]) <= 1 / n_test
