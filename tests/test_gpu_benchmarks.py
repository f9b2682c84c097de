"""The GPU benchmarks run end to end at toy size on the CPU and write their reports; the FLOP count behind MFU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from align_diffusion.training.config import load_config
from align_diffusion.training.grpo import GRPOTrainer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


# Runs benchmark scripts one after another in one process, as `python SCRIPT ARGS...` would each.
RUN_IN_TURN = """
import json, runpy, sys
sys.path.insert(0, sys.argv[1])  # the scripts' folder, which their own imports read from
for argv in json.loads(sys.argv[2]):
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""


def run_benchmarks(tmp_path: Path, runs: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    """Runs each (script, *args) at toy size on the CPU, in turn in one process (a process each would import torch
    and diffusers again, seconds each time), with a temporary folder that they must leave empty of their trainers'
    outputs; returns each run's report by name."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    argvs = {name: [str(BENCHMARKS / script), "--toy", "--device", "cpu", *args, "--out",
                    str(tmp_path / f"{name}.json")] for name, (script, *args) in runs.items()}
    completed = subprocess.run([sys.executable, "-c", RUN_IN_TURN, str(BENCHMARKS), json.dumps(list(argvs.values()))],
                               capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(temp)})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not list(temp.glob("grpo_bench_*"))
    reports = {name: json.loads(Path(argv[-1]).read_text()) for name, argv in argvs.items()}
    for report in reports.values():
        assert report["environment"]["device_type"] == "cpu"
        assert report["environment"]["versions"]["torch"] == torch.__version__.split("+")[0]
    return reports


def test_counted_flops_of_a_linear_layer_forward_and_backward(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from measure import counted_flops

    layer = torch.nn.Linear(3, 5)
    x = torch.randn(4, 3, requires_grad=True)
    with counted_flops() as counted:
        layer(x).sum().backward()
    # forward 2·B·in·out; backward the same twice more: the input's gradient and the weight's
    assert counted["flops"] == 3 * 2 * 4 * 3 * 5


def test_counted_flops_of_attention_are_its_model_flops(monkeypatch):
    """Forward: q·kᵀ and the weights times v, 2·b·h·s_q·s_k·d each; backward twice the forward (torch's count of a
    CUDA backward adds the scores computed again; it counted none of the CPU's SDPA)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from measure import counted_flops

    query = torch.randn(2, 3, 5, 4, requires_grad=True)
    key, value = torch.randn(2, 3, 7, 4, requires_grad=True), torch.randn(2, 3, 7, 4, requires_grad=True)
    with counted_flops() as counted:
        torch.nn.functional.scaled_dot_product_attention(query, key, value).sum().backward()
    forward = 2 * (2 * 2 * 3 * 5 * 7 * 4)
    assert counted["flops"] == 3 * forward


def test_bf16_peaks_match_the_most_specific_device_name(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from measure import bf16_peak

    assert bf16_peak("NVIDIA H100 80GB HBM3") == ("H100", 989.5)  # the SXM board
    assert bf16_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756.5)
    assert bf16_peak("NVIDIA H100 NVL") == ("H100 NVL", 835.5)
    assert bf16_peak("NVIDIA H200 NVL") == ("H200 NVL", 835.5)
    assert bf16_peak("NVIDIA GH200 480GB") is None  # not in the table, though its name holds "H200"


def test_full_size_vae_has_the_published_32_norm_groups(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from architectures import built_on, vae

    with built_on("meta", torch.bfloat16):
        assert vae(16, toy=False).config.norm_num_groups == 32


@pytest.fixture(scope="module")
def toy_reports(tmp_path_factory):
    """The float32 runs, in one process."""
    return run_benchmarks(tmp_path_factory.mktemp("toy"), {
        # with xformers too, which the CPU refuses: the profile after it runs SDPA's processors again
        "grpo": ("grpo_step.py", "--group", "4", "--micro-batch", "2", "--resolution", "32", "--profile", "3",
                 "--attention", "both"),
        "flux": ("grpo_step.py", "--arch", "flux-dev", "--group", "2", "--micro-batch", "1", "--resolution", "32",
                 "--checkpointing", "on"),
        "reno": ("reno_step.py", "--dtype", "float32", "--resolution", "16", "--iterations", "4", "--channels-last",
                 "--profile", "2"),
        "fk": ("fk_vs_batch.py", "--resolution", "32", "--steps", "6", "--interval", "2", "--repeats", "1",
               "--cudnn-benchmark", "--profile", "2"),
    })


def test_grpo_step_benchmark_runs_the_preset_at_toy_size(toy_reports):
    grpo_report = toy_reports["grpo"]
    assert grpo_report["config"]["trainer_config"]["lora"]["rank"] == 32  # the SD3.5-M preset's LoRA
    results = grpo_report["results"]
    assert results["update_flops"] > 0 and 0 < results["trained_parameters"] < results["parameters"]
    assert sum(results["update_flops_by_op"].values()) == results["update_flops"]
    settings = results["settings"]
    assert [s["attention"] for s in settings] == ["sdpa", "sdpa", "xformers"] and "error" in settings[-1]
    settings = settings[:2]
    assert [s["gradient_checkpointing"] for s in settings] == [False, True]
    for setting in settings:
        assert "error" not in setting
        assert setting["train_timesteps"] == 10  # the preset's 10 SDE steps, each trained
        assert setting["first_ratio_max_deviation"] <= 1e-5  # float32 on the CPU: on-policy
        assert setting["rollout_images_per_second"] > 0 and setting["train_seconds_per_image"] > 0
    profile = results["profile"]
    assert len(profile["top_ops"]) == 3 and profile["top_kernels"] == []  # no kernels on the CPU
    seconds = [op["seconds"] for op in profile["top_ops"]]
    assert seconds == sorted(seconds, reverse=True)
    assert 0 < sum(seconds) <= profile["busy_seconds"]  # the top ops are some of all the ops timed
    assert any("scaled_dot_product" in op["name"] or "mm" in op["name"] for op in profile["top_ops"])


def test_profile_counts_the_aten_ops_dispatched(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from measure import profiled

    x, y = torch.randn(4), torch.randn(4)
    with profiled("cpu", 2) as profile:
        for _ in range(3):
            torch.mul(x, y)
        torch.add(x, y)
    assert profile["aten_ops"] == 4  # tensor-tensor mul and add dispatch no nested ops
    assert [(op["name"], op["calls"]) for op in profile["top_ops"]] in ([("aten::mul", 3), ("aten::add", 1)],
                                                                        [("aten::add", 1), ("aten::mul", 3)])


def test_update_flops_equal_a_whole_update_counted(toy_reports, monkeypatch, tmp_path):
    """The script counts one trained timestep and multiplies by the timesteps trained; counting a whole update of
    the same run here, checkpointing off (recomputation is not counted), gives the same numbers, op by op."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from architectures import sd35_medium
    from measure import ATTENTION_FLOPS

    grpo_report = toy_reports["grpo"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(grpo_report["config"]["trainer_config"]))
    config = load_config(config_file, [f"output_dir={tmp_path / 'run'}", "optim.gradient_checkpointing=false"])
    trainer = GRPOTrainer(config, adapter=sd35_medium("cpu", torch.float32, toy=True))
    rollouts = trainer.rollout(0)
    advantages, _ = trainer.advantages(rollouts)
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
    with counter:
        trainer.update(rollouts, advantages, 0)
    counted = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert counted == grpo_report["results"]["update_flops_by_op"]
    assert counter.get_total_flops() == grpo_report["results"]["update_flops"]


def test_grpo_step_benchmark_runs_flux_at_toy_size(toy_reports):
    report = toy_reports["flux"]
    assert report["config"]["preset"] == "configs/flux_dev_grpo_pickscore.yaml"
    [setting] = report["results"]["settings"]
    assert "error" not in setting and setting["gradient_checkpointing"] is True
    assert setting["train_seconds_per_image"] > 0


def test_grpo_step_benchmark_runs_in_bfloat16(tmp_path):
    """Also asked for xformers, which needs CUDA (or is not installed): its setting reports why it did not run."""
    # A process of its own: accelerate fixes the mixed-precision mode once per process.
    report = run_benchmarks(tmp_path, {"bf16": ("grpo_step.py", "--dtype", "bfloat16", "--group", "2", "--micro-batch",
                                                "2", "--resolution", "32", "--checkpointing", "off", "--attention",
                                                "both")})["bf16"]
    assert report["config"]["dtype"] == "torch.bfloat16"
    assert report["config"]["trainer_config"]["optim"]["mixed_precision"] == "bf16"
    sdpa, xformers = report["results"]["settings"]
    assert sdpa["attention"] == "sdpa" and "error" not in sdpa and sdpa["train_seconds_per_image"] > 0
    assert xformers["attention"] == "xformers" and xformers["error"]


def test_reno_benchmark_times_iterations(toy_reports):
    report = toy_reports["reno"]
    assert report["config"]["channels_last"] is True
    results = report["results"]
    # At toy size an iteration takes milliseconds, within the timing noise: the time is checked for its arithmetic.
    assert results["seconds_per_iteration"] * 4 == pytest.approx(results["seconds"]
                                                                 - results["seconds_without_iterations"])
    assert 0 <= results["best_iteration"] <= 4
    assert len(results["profile_2_iterations"]["top_ops"]) == 2
    assert results["aten_ops_per_iteration"] > 0 and float(results["aten_ops_per_iteration"]).is_integer()
    assert len(set(results["reward_first_last"])) == 2  # the noise moved: the reward of the last iterate changed


def test_fk_benchmark_compares_with_a_plain_batch(toy_reports):
    report = toy_reports["fk"]
    assert report["config"]["cudnn_benchmark"] is True
    results = report["results"]
    assert len(results["fk_profile"]["top_ops"]) == 2
    assert results["fk"]["seconds"] > 0 and results["plain_batch"]["seconds"] > 0
    assert results["fk_scored_steps"] == [1, 3, 5]  # every 2nd step from 20 % of the 6 steps to 80 %, and the last
