"""The training loop on the real demo model: reference pass, adapters mlx-lm loads, exact resume,
clipping with mu > 1, KL, reward failures, dynamic sampling, the CLI end to end."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx import cpu_kernels
from grpo_mlx.batch import training_arrays
from grpo_mlx.config import DEMO_DATA, DEMO_MODEL, build_config
from grpo_mlx.events import EventBus, read_jsonl
from grpo_mlx.logprobs import completion_logprobs
from grpo_mlx.policy import adapters_disabled, load_model, prepare_for_cpu
from grpo_mlx.trainer import Trainer, TrainingStopped


def small_config(tmp_path, **overrides):
    flags = dict(
        adapter_path=str(tmp_path / "run"),
        batch_size=4,
        group_size=4,
        iters=3,
        eval_limit=0,
        save_every=100,
        learning_rate=1e-3,
    )
    flags.update(overrides)
    return build_config(flags)


def teacher_forced(trainer, model, n_prompts=4):
    """Log-probs of a fixed set of greedy completions under `model`."""
    examples = trainer.train_examples[:n_prompts]
    prompts = [ex["prompt_ids"] for ex in examples]
    from grpo_mlx.sampler import generate_groups

    roll = generate_groups(trainer.model, trainer.tokenizer, prompts, 2, 6, temperature=1.0)
    tokens, lens, mask = training_arrays(prompts, roll, 2, trainer.pad_id)
    return np.array(completion_logprobs(model, tokens, lens, mask.shape[1])) * np.array(mask), (tokens, lens, mask)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short real run with a large learning rate, so the adapters are far from zero."""
    tmp = tmp_path_factory.mktemp("trained")
    trainer = Trainer(small_config(tmp, iters=4, learning_rate=2e-2))
    trainer.run()
    return trainer


def test_reference_pass_is_the_base_model_exactly(trained):
    base, _ = load_model(DEMO_MODEL)
    prepare_for_cpu(base)  # the base as grpo-mlx runs it
    policy_lp, batch = teacher_forced(trained, trained.model)
    tokens, lens, mask = batch
    base_lp = np.array(completion_logprobs(base, tokens, lens, mask.shape[1])) * np.array(mask)
    trained.model.eval()
    with adapters_disabled(trained.model):
        ref_lp = np.array(completion_logprobs(trained.model, tokens, lens, mask.shape[1])) * np.array(mask)
    assert np.abs(policy_lp - base_lp).max() > 1e-3, "the adapters should have changed the policy"
    assert np.array_equal(ref_lp, base_lp), "adapters off must give the base model's log-probs exactly"
    # and switching them back on restores the policy
    again = np.array(completion_logprobs(trained.model, tokens, lens, mask.shape[1])) * np.array(mask)
    assert np.array_equal(again, policy_lp)


def test_adapters_load_in_mlx_lm_with_same_logprobs(trained):
    from mlx_lm import load

    run_dir = trained.run_dir
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["model"] == DEMO_MODEL and config["fine_tune_type"] == "lora"
    assert set(config["lora_parameters"]) >= {"rank", "scale", "dropout"}
    model, _ = load(config["model"], adapter_path=str(run_dir))
    model.set_dtype(mx.float32)
    model.eval()
    trained.model.eval()
    with cpu_kernels.standard(trained.model):  # mlx-lm's own code on both sides
        policy_lp, (tokens, lens, mask) = teacher_forced(trained, trained.model)
    loaded_lp = np.array(completion_logprobs(model, tokens, lens, mask.shape[1])) * np.array(mask)
    np.testing.assert_allclose(loaded_lp, policy_lp, atol=1e-5)


def test_run_directory_contents(trained):
    run_dir = trained.run_dir
    steps = [e for e in read_jsonl(str(run_dir / "metrics.jsonl")) if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for key in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "loss",
        "grad_norm",
        "learning_rate",
        "completions/mean_length",
        "completions/clipped_ratio",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "rewards/accuracy/mean",
        "step_time",
        "tokens_per_second",
        "peak_memory_gb",
    ]:
        assert key in steps[0]["metrics"], key
    samples = read_jsonl(str(run_dir / "samples.jsonl"))
    assert len(samples) == 4
    comp = samples[0]["groups"][0]["completions"]
    assert len(comp) == 4 and {"text", "rewards", "reward", "advantage", "length", "finish_reason"} <= set(comp[0])
    adv = [c["advantage"] for c in comp]
    assert abs(sum(adv)) < 1e-4, "group advantages are centred"
    assert (run_dir / "checkpoints" / "step_0000004" / "optimizer.safetensors").exists()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


def test_resume_matches_straight_run(tmp_path):
    """10 steps, a stop, then 10 resumed steps end with the adapters (and rewards) of 20 straight steps."""
    straight = Trainer(small_config(tmp_path / "a", iters=20))
    straight.run()

    bus = EventBus()
    interrupted = Trainer(small_config(tmp_path / "b", iters=20), bus)
    bus.subscribe(lambda e: e["type"] == "step" and e["step"] == 10 and interrupted.control.stop.set())
    summary = interrupted.run()
    assert summary["status"] == "stopped" and summary["steps"] == 10

    resumed_cfg = build_config(
        {"resume": str(tmp_path / "b" / "run")}, base=json.loads((tmp_path / "b" / "run" / "config.json").read_text())
    )
    resumed = Trainer(resumed_cfg)
    assert resumed.run()["steps"] == 20

    a = mx.load(str(tmp_path / "a" / "run" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "run" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, err_msg=k)
    rewards_a = [
        e["metrics"]["reward"] for e in read_jsonl(str(tmp_path / "a" / "run" / "metrics.jsonl")) if e["type"] == "step"
    ]
    rewards_b = [
        e["metrics"]["reward"] for e in read_jsonl(str(tmp_path / "b" / "run" / "metrics.jsonl")) if e["type"] == "step"
    ]
    assert rewards_a == rewards_b


def _step_metrics(trainer):
    return [e["metrics"] for e in read_jsonl(str(trainer.run_dir / "metrics.jsonl")) if e["type"] == "step"]


def test_clipping_acts_when_mu_above_one(tmp_path):
    t = Trainer(small_config(tmp_path, iters=2, num_iterations=4, learning_rate=5e-2, epsilon=0.05))
    t.run()
    assert max(m["clip_ratio/region_mean"] for m in _step_metrics(t)) > 0


def test_no_clipping_when_mu_is_one(tmp_path):
    t = Trainer(small_config(tmp_path, iters=2, learning_rate=5e-2, epsilon=0.05))
    t.run()
    assert all(m["clip_ratio/region_mean"] == 0 for m in _step_metrics(t))


def test_kl_is_zero_at_start_and_grows(tmp_path):
    t = Trainer(small_config(tmp_path, iters=3, beta=0.1, learning_rate=5e-2))
    t.run()
    kl = [m["kl"] for m in _step_metrics(t)]
    assert kl[0] == 0.0, "adapters start at zero, so the policy equals the reference"
    assert kl[-1] > 0


def test_reward_function_failure_stops_with_checkpoint(tmp_path):
    reward_file = tmp_path / "bad_reward.py"
    reward_file.write_text("def explode(prompts, completions, **kw):\n    raise ZeroDivisionError('boom')\n")
    t = Trainer(small_config(tmp_path, reward_functions=[f"{reward_file}:explode"]))
    with pytest.raises(TrainingStopped, match="explode"):
        t.run()
    assert (t.run_dir / "adapters.safetensors").exists()
    assert (t.run_dir / "checkpoints" / "latest").exists()


def test_dynamic_sampling_drops_flat_groups(tmp_path):
    reward_file = tmp_path / "flat.py"
    reward_file.write_text("def flat(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    t = Trainer(
        small_config(
            tmp_path, iters=1, dynamic_sampling=True, max_resample_rounds=2, reward_functions=[f"{reward_file}:flat"]
        )
    )
    t.run()
    m = _step_metrics(t)[0]
    assert m["frac_reward_zero_std"] == 1.0 and m["resample_rounds"] == 2
    assert t.state["data_position"] == 4 * 3  # three rounds of 4 prompts were drawn


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    run = tmp_path / "cli_run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_mlx",
            "train",
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--group-size",
            "4",
            "--eval-limit",
            "16",
            "--adapter-path",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "held-out accuracy" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert {"accuracy_before", "accuracy_after", "steps"} <= set(summary) and summary["steps"] == 2


def test_cli_missing_model_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_mlx", "train", "--model", str(tmp_path / "nope"), "--data", DEMO_DATA],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The README's promise: `grpo-mlx train` with no options takes the demo model from <= 50%
    to >= 90% held-out accuracy within 200 steps."""
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_mlx", "train", "--adapter-path", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["steps"] == 200
    assert summary["accuracy_before"] <= 0.50
    assert summary["accuracy_after"] >= 0.90


def test_a_checkpoint_is_written_once_per_step(tmp_path):
    """iters a multiple of save_every: the last step's checkpoint is not written (and logged) twice."""
    cfg = build_config({"adapter_path": str(tmp_path / "run"), "iters": 2, "save_every": 1, "eval_limit": 0,
                        "batch_size": 2, "group_size": 2})  # fmt: skip
    trainer = Trainer(cfg)
    seen = []
    trainer.bus.subscribe(lambda e: e["type"] == "checkpoint" and seen.append(e["step"]))
    trainer.run()
    assert seen == [1, 2]


def test_prompt_options_reach_the_trainer_and_its_notes_the_run_log_once(tmp_path):
    seen = []
    bus = EventBus()
    bus.subscribe(seen.append)
    trainer = Trainer(small_config(tmp_path, ignore_chat_template=True), bus)
    trainer.setup()
    assert trainer.train_examples[0]["prompt_text"] == trainer.train_examples[0]["prompt"]  # no template "="
    notes = [e["text"] for e in seen if e["type"] == "message" and "--ignore-chat-template" in e["text"]]
    assert len(notes) == 1
    plain = Trainer(small_config(tmp_path / "b"))
    plain.setup()
    assert plain.train_examples[0]["prompt_text"] == plain.train_examples[0]["prompt"] + "="


def test_quantized_cache_and_waves_train_and_log_the_gap(tmp_path):
    """The demo with an 8-bit rollout cache decoded in waves: the steps run, and every step logs
    the sampler/trainer log-prob gap, now above the float noise of a full-precision cache."""
    cfg = small_config(tmp_path, iters=2, kv_bits=8, kv_group_size=32, rollout_batch_size=6)
    trainer = Trainer(cfg)
    trainer.run()
    steps = [e for e in read_jsonl(str(trainer.run_dir / "metrics.jsonl")) if e["type"] == "step"]
    assert len(steps) == 2
    for s in steps:
        gap = s["metrics"]["sampling/sampling_logp_difference/mean"]
        assert 1e-5 < gap < 0.05 and s["metrics"]["sampling/sampling_logp_difference/max"] >= gap
