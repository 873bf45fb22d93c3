"""Config: defaults, YAML + flags precedence, validation messages, and the generated CLI."""

import subprocess
import sys

import pytest

from grpo_mlx import cli
from grpo_mlx.config import DEMO_DEFAULTS, DEMO_MODEL, ConfigError, build_config, load_yaml


def test_no_arguments_is_the_demo():
    cfg = build_config({})
    assert cfg.model == DEMO_MODEL and cfg.is_demo
    assert cfg.data == DEMO_DEFAULTS["data"]
    assert cfg.learning_rate == DEMO_DEFAULTS["learning_rate"]


def test_user_model_needs_data():
    with pytest.raises(ConfigError, match="'data'"):
        build_config({"model": "Qwen/Qwen2.5-0.5B-Instruct"})


def test_user_model_does_not_get_demo_defaults():
    cfg = build_config({"model": "Qwen/Qwen2.5-0.5B-Instruct", "data": "./task"})
    assert cfg.learning_rate == 1e-5 and cfg.num_layers == 16 and not cfg.is_demo


def test_yaml_fills_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: some/model\ndata: ./d\nbatch-size: 4\nbeta: 0.04\nreward_functions: [accuracy, format]\n")
    cfg = build_config({"beta": "0.1"}, str(path))
    assert cfg.batch_size == 4  # from YAML, hyphenated key accepted
    assert cfg.beta == 0.1  # flag wins
    assert cfg.reward_functions == ["accuracy", "format"]


def test_yaml_unknown_key_names_line_and_closest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\n\nlerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    assert f"{path}:3" in str(e.value)
    assert "lerning_rate" in str(e.value) and "did you mean 'learning_rate'" in str(e.value)


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nbeta: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_yaml(path)


@pytest.mark.parametrize(
    "flags, key",
    [
        ({"group_size": 1}, "group_size"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"beta": -0.1}, "beta"),
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights"),
        ({"scale_rewards": "median"}, "scale_rewards"),
        ({"batch_size": 3, "group_size": 2, "gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ],
)
def test_invalid_values_name_the_key(flags, key):
    with pytest.raises(ConfigError) as e:
        build_config(flags)
    assert f"'{key}'" in str(e.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'group_size': expected int, got 'eight'"):
        build_config({"group_size": "eight"})


def test_loss_type_message_lists_valid_values():
    with pytest.raises(ConfigError, match="grpo, bnpo, dr_grpo, dapo"):
        build_config({"loss_type": "ppo"})


def test_cli_generates_a_flag_per_field():
    parser = cli.make_parser()
    args = parser.parse_args(
        ["train", "--group-size", "4", "--reward-functions", "accuracy", "format", "--dynamic-sampling"]
    )
    cfg = cli.config_from_args(args)
    assert cfg.group_size == 4 and cfg.reward_functions == ["accuracy", "format"] and cfg.dynamic_sampling


def test_cli_typo_flag_suggests_closest():
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_mlx", "train", "--lerning-rate", "1e-4"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "--lerning-rate" in proc.stderr and "--learning-rate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_value_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_mlx", "train", "--group-size", "1"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "'group_size'" in proc.stderr and "Traceback" not in proc.stderr
