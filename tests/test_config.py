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


# ------------------------------------------------------------------ values checked where they enter

BAD_VALUES = {
    "lr_nan": ({"learning_rate": "nan"}, "'learning_rate' = nan"),
    "lr_inf": ({"learning_rate": "inf"}, "'learning_rate' = inf"),
    "temperature_inf": ({"temperature": "inf"}, "'temperature' = inf"),
    "lora_scale_nan": ({"lora_scale": "nan"}, "'lora_scale' = nan"),
    "beta_inf": ({"beta": "inf"}, "'beta' = inf"),
    "weight_nan": ({"reward_weights": ["nan"]}, "'reward_weights'"),
    "seed_negative": ({"seed": "-1"}, "'seed' = -1"),
    "seed_huge": ({"seed": str(2**64)}, "'seed'"),
    "isolation": ({"reward_isolation": "container"}, "'reward_isolation'"),
    "resume_and_overwrite": ({"resume": "r", "overwrite": True}, "'overwrite'"),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_values_are_refused_naming_key_and_value(name):
    flags, expected = BAD_VALUES[name]
    with pytest.raises(ConfigError) as e:
        build_config(flags)
    assert expected in str(e.value)


BAD_YAML = {
    "null_required": ("batch_size: null\n", "'batch_size': null"),
    "null_list": ("stop: null\n", "'stop': null"),
    "duplicate": (
        "beta: 0.1\nlr: 1\n".replace("lr: 1\n", "beta: 0.2\n"),
        ":2: key 'beta' is given twice (first at line 1)",
    ),
    "duplicate_spelling": ("batch-size: 2\nbatch_size: 4\n", ":2: key 'batch_size' is given twice"),
    "stop_not_strings": ("stop: [1, 2]\n", "'stop': expected a list of strings, got int"),
    "stop_object": ("stop: {a: b}\n", "'stop': expected a list of strings, got dict"),
    "keys_not_strings": ("lora_keys: [[q_proj]]\n", "'lora_keys': expected a list of strings"),
    "weights_bool": ("reward_weights: [true]\n", "'reward_weights': expected numbers"),
    "model_list": ("model: [a, b]\ndata: d\n", "'model': expected one value, got list"),
    "prompt_key_number": ("prompt_key: 5\n", "'prompt_key': expected str"),
    "lr_inf_yaml": ("learning_rate: .inf\n", "'learning_rate' = inf"),
    "iters_nan_yaml": ("iters: .nan\n", "'iters': expected int"),
}


@pytest.mark.parametrize("name", sorted(BAD_YAML))
def test_bad_yaml_values_are_refused(name, tmp_path):
    text, expected = BAD_YAML[name]
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        build_config({}, str(path))
    assert expected in str(e.value), str(e.value)


def test_local_paths_are_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "r.py").write_text("def f(prompts, completions, **kw): return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"model": "m", "data": "d", "reward_functions": ["r.py:f", "accuracy"]})
    assert cfg.model == str(tmp_path / "m") and cfg.data == str(tmp_path / "d")
    assert cfg.reward_functions == [f"{tmp_path / 'r.py'}:f", "accuracy"]
    hub = build_config({"model": "owner/name", "data": "owner/data"})  # not local: left as Hub ids
    assert hub.model == "owner/name" and hub.data == "owner/data"


# ------------------------------------------------------------------ resume rules


def recorded(tmp_path, **kw):
    import json

    from grpo_mlx.config import to_dict

    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    cfg = build_config({"adapter_path": str(run), "group_size": 4, **kw})
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    return run


def test_resume_alone_uses_the_recorded_config(tmp_path):
    from grpo_mlx.config import build_resumed_config

    run = recorded(tmp_path, lora_rank=4, beta=0.05)
    cfg = build_resumed_config(str(run), {})
    assert (cfg.lora_rank, cfg.beta, cfg.group_size, cfg.resume) == (4, 0.05, 4, str(run))


def test_resume_with_a_yaml_still_starts_from_the_record(tmp_path):
    from grpo_mlx.config import build_resumed_config

    run = recorded(tmp_path, lora_rank=4)
    (tmp_path / "more.yaml").write_text("iters: 500\n")
    cfg = build_resumed_config(str(run), {}, str(tmp_path / "more.yaml"))
    assert cfg.iters == 500 and cfg.lora_rank == 4


def test_resume_refuses_result_changing_options_naming_each(tmp_path):
    from grpo_mlx.config import build_resumed_config

    run = recorded(tmp_path)
    with pytest.raises(ConfigError) as e:
        build_resumed_config(str(run), {"group_size": "8", "loss_type": "dapo", "iters": "9"})
    assert "group_size 4 -> 8" in str(e.value) and "loss_type 'grpo' -> 'dapo'" in str(e.value)
    assert "iters 200" not in str(e.value)  # iters may change: not listed as a difference


def test_resume_may_change_what_cannot_change_the_result(tmp_path):
    from grpo_mlx.config import RESUME_MAY_CHANGE, build_resumed_config

    run = recorded(tmp_path)
    cfg = build_resumed_config(
        str(run),
        {
            "iters": "300",
            "save_every": "7",
            "eval_every": "3",
            "reward_timeout": "5",
            "samples_per_step": "1",
            "reward_isolation": "process",
        },
    )
    assert (cfg.iters, cfg.save_every, cfg.reward_isolation) == (300, 7, "process")
    assert "model" not in RESUME_MAY_CHANGE and "learning_rate" not in RESUME_MAY_CHANGE


def test_resume_elsewhere_or_without_config_is_refused(tmp_path):
    from grpo_mlx.config import build_resumed_config

    run = recorded(tmp_path)
    with pytest.raises(ConfigError, match="stays in its directory"):
        build_resumed_config(str(run), {"adapter_path": str(tmp_path / "other")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        build_resumed_config(str(tmp_path / "empty"), {})


def test_chat_template_kwargs_from_yaml_mapping_and_cli_json(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("chat_template_kwargs:\n  enable_thinking: false\n", encoding="utf-8")
    assert build_config({}, str(path)).chat_template_kwargs == {"enable_thinking": False}
    args = cli.make_parser().parse_args(["train", "--chat-template-kwargs", '{"enable_thinking": false, "x": 1}'])
    assert cli.config_from_args(args).chat_template_kwargs == {"enable_thinking": False, "x": 1}
    assert build_config({}).chat_template_kwargs is None  # the template's own defaults
    with pytest.raises(ConfigError, match="'chat_template_kwargs': not valid JSON"):
        build_config({"chat_template_kwargs": "{enable_thinking: false}"})
    with pytest.raises(ConfigError, match="'chat_template_kwargs': expected a mapping"):
        build_config({"chat_template_kwargs": "[1, 2]"})


def test_prompt_and_dataset_flags():
    args = cli.make_parser().parse_args(["train", "--ignore-chat-template", "--data-config", "main", "--dry-run"])
    cfg = cli.config_from_args(args)
    assert cfg.ignore_chat_template is True and cfg.data_config == "main" and args.dry_run
