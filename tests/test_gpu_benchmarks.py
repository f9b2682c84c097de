"""The GPU benchmarks run end to end at toy size on the CPU and write their reports; the FLOP count behind MFU."""

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


def run_benchmark(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    completed = subprocess.run([sys.executable, str(BENCHMARKS / script), "--toy", "--device", "cpu", *args,
                                "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["device_type"] == "cpu"
    assert report["environment"]["versions"]["torch"] == torch.__version__.split("+")[0]
    return report


def test_counted_flops_of_a_linear_layer_forward_and_backward(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from measure import counted_flops

    layer = torch.nn.Linear(3, 5)
    x = torch.randn(4, 3, requires_grad=True)
    with counted_flops() as counted:
        layer(x).sum().backward()
    # forward 2·B·in·out; backward the same twice more: the input's gradient and the weight's
    assert counted["flops"] == 3 * 2 * 4 * 3 * 5


def test_grpo_step_benchmark_runs_the_preset_at_toy_size(tmp_path):
    report = run_benchmark("grpo_step.py", tmp_path, "--group", "4", "--micro-batch", "2", "--resolution", "32")
    assert report["config"]["trainer_config"]["lora"]["rank"] == 32  # the SD3.5-M preset's LoRA
    results = report["results"]
    assert results["update_tflop"] > 0 and 0 < results["trained_parameters"] < results["parameters"]
    settings = results["settings"]
    assert [s["gradient_checkpointing"] for s in settings] == [False, True]
    for setting in settings:
        assert "error" not in setting
        assert setting["train_timesteps"] == 10  # the preset's 10 SDE steps, each trained
        assert setting["rollout_images_per_second"] > 0 and setting["train_seconds_per_image"] > 0


def test_reno_benchmark_times_iterations(tmp_path):
    report = run_benchmark("reno_step.py", tmp_path, "--dtype", "float32", "--resolution", "16", "--iterations", "2")
    results = report["results"]
    assert results["seconds_per_iteration"] > 0 and 0 <= results["best_iteration"] <= 2
    assert len(set(results["reward_first_last"])) == 2  # the noise moved: the reward of the last iterate changed


def test_fk_benchmark_compares_with_a_plain_batch(tmp_path):
    report = run_benchmark("fk_vs_batch.py", tmp_path, "--resolution", "32", "--steps", "6", "--interval", "2",
                           "--repeats", "1")
    results = report["results"]
    assert results["fk"]["seconds"] > 0 and results["plain_batch"]["seconds"] > 0
    assert results["fk_scored_steps"] == [0, 2, 4, 5]  # every 2nd step from 0, and the last
