import json

from grpo_mlx import bench_peers
from grpo_mlx.peer_workers import StepClock, digit_reward


def test_the_clock_times_each_step_and_drops_the_warm_up():
    clock = StepClock()
    clock.ends = [0.0, 5.0, 6.0, 7.5, 9.0]  # a tick before step 1, then one per step end
    assert clock.seconds(warmup=2) == [1.5, 1.5]
    assert clock.seconds(warmup=0) == [5.0, 1.0, 1.5, 1.5]


def test_the_reward_reads_text_and_conversational_completions_alike():
    assert digit_reward(["p", "p"], ["a1", "xx"]) == [0.5, 0.0]
    assert digit_reward(["p"], [[{"role": "assistant", "content": "12"}]]) == [1.0]


def test_medians_pool_every_timed_step_and_skip_failed_runs():
    runs = {"a": [{"seconds": [1.0, 3.0], "gflops": 10, "blas": "x"}, {"error": "boom"},
                  {"seconds": [2.0], "gflops": 20, "blas": "x"}]}  # fmt: skip
    s = bench_peers.summarize(runs)["a"]
    assert s["median_s"] == 2.0 and s["run_medians"] == [2.0, 2.0] and s["gflops"] == 15


def test_a_peer_without_a_python_is_skipped_with_a_message(capsys):
    assert bench_peers.main(["--trainers", "mlx-lm-lora,unsloth"]) == 1
    err = capsys.readouterr().err
    assert "skipping mlx-lm-lora" in err and "skipping unsloth" in err and "--peer-python" in err


def test_a_peer_python_without_the_package_is_skipped(capsys):
    import sys

    assert bench_peers.main(["--trainers", "unsloth", "--unsloth-python", sys.executable]) == 1
    assert "unsloth_zoo is not installed" in capsys.readouterr().err


def test_the_model_directory_cannot_stop_early(tmp_path):
    from transformers import AutoTokenizer

    path = bench_peers.save_model_dir(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.eos_token == bench_peers.STOP
    assert tok.eos_token_id == config["vocab_size"]  # one past the model's last logit: never sampled
    assert 3.5e6 < json.loads((path / "bench_params.json").read_text())["parameters"] < 4.5e6
