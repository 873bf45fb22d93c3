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
        ({"kv_bits": 7}, "kv_bits"),
        ({"kv_bits": 16}, "kv_bits"),
        ({"kv_group_size": 16}, "kv_group_size"),
        ({"rollout_batch_size": 0}, "rollout_batch_size"),
        ({"kv_bits": 8, "tools": ["calculator"]}, "kv_bits"),
        ({"rollout_batch_size": 4, "demo": "tools"}, "rollout_batch_size"),
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
    "stop_with_tools": ({"stop": ["\n"], "tools": ["calculator"]}, "'stop'"),  # episodes end by turns, not stops
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


@pytest.mark.parametrize(
    "flags, key",
    [
        ({"loss_type": "cispo", "epsilon_high": 0.28}, "epsilon_high"),  # the old 1 + ε_high reading
        ({"loss_type": "vespo", "importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"loss_type": "gmpo", "importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"loss_type": "luspo"}, "importance_sampling_level"),  # luspo needs sequence-level ratios
        ({"loss_type": "sapo", "delta": 3.0}, "delta"),
        ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg"),
        ({"vespo_lambda_pos": 0.0}, "vespo_lambda_pos"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
        ({"entropy_coef_min": 2.0}, "entropy_coef_min"),
        ({"use_adaptive_entropy": True, "entropy_coef": 3.0}, "entropy_coef"),
        ({"off_policy_mask_threshold": -0.1}, "off_policy_mask_threshold"),
        ({"importance_sampling_mode": "token_clip"}, "importance_sampling_mode"),
        ({"importance_sampling_clip_min": 4.0}, "importance_sampling_clip_min"),
        ({"importance_sampling_correction": True, "loss_type": "vespo"}, "importance_sampling_mode"),
        ({"importance_sampling_correction": True, "loss_type": "gmpo"}, "importance_sampling_correction"),
        ({"sync_ref_model": True}, "sync_ref_model"),  # beta = 0: no reference to move
        ({"sync_ref_model": True, "beta": 0.1, "ref_update_every": 5}, "sync_ref_model"),
        ({"ref_model_mixup_alpha": 1.5}, "ref_model_mixup_alpha"),
        ({"ref_model_sync_steps": 0}, "ref_model_sync_steps"),
    ],
)
def test_objective_options_refused_with_their_key(flags, key):
    with pytest.raises(ConfigError) as e:
        build_config(flags)
    assert f"'{key}'" in str(e.value)


def test_objective_options_defaults_and_accepted_combinations():
    cfg = build_config({})
    assert (cfg.sapo_temperature_pos, cfg.sapo_temperature_neg) == (1.0, 1.05)
    assert (cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg) == (2.0, 3.0, 3.0, 2.0)
    assert cfg.top_entropy_quantile == 1.0 and cfg.entropy_coef == 0.0 and not cfg.use_bias_correction_kl
    assert (cfg.importance_sampling_mode, cfg.importance_sampling_clip_max) == ("sequence_mask", 3.0)
    assert (cfg.ref_model_mixup_alpha, cfg.ref_model_sync_steps) == (0.6, 512)
    for flags in (
        {"loss_type": "cispo", "epsilon_high": 5.0},
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},
        {"loss_type": "gmpo", "epsilon": 0.4},
        {"loss_type": "sapo"},
        {"loss_type": "vespo"},
        {"importance_sampling_correction": True, "importance_sampling_mode": "token_truncate"},
        {"sync_ref_model": True, "beta": 0.04},
        {"use_adaptive_entropy": True, "top_entropy_quantile": 0.2},
    ):
        build_config(flags)


def test_config_stays_free_of_mlx():
    code = "import sys, grpo_mlx.config; assert 'mlx.core' not in sys.modules, 'config imported MLX'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ TRL / mlx-lm spellings


def test_every_field_has_a_help_group_and_groups_name_only_fields():
    from grpo_mlx.config import FIELDS, OPTION_GROUPS

    placed = [name for names in OPTION_GROUPS.values() for name in names]
    assert sorted(placed) == sorted(FIELDS), set(FIELDS) ^ set(placed)  # each field once, nothing else


def test_help_shows_the_groups_in_order():
    help_text = cli.make_parser()._subparsers._group_actions[0].choices["train"].format_help()
    text = help_text[help_text.index("\noptions:") :]  # the body, not the usage line
    titles = ["model and prompts:", "data:", "sampling:", "objective:", "adapters:", "optimisation:"]
    assert all(t in text for t in titles)
    assert text.index("sampling:") < text.index("--temperature") < text.index("objective:") < text.index("--beta")


@pytest.mark.parametrize(
    "synonym, field, value, expected",
    [
        ("num_generations", "group_size", "4", 4),
        ("output_dir", "adapter_path", "runs/x", "runs/x"),
        ("max_steps", "iters", "7", 7),
        ("lora_layers", "num_layers", "2", 2),
        ("max_tokens", "max_completion_length", "32", 32),
        ("lr", "learning_rate", "3e-4", 3e-4),
    ],
)
def test_trl_and_mlx_lm_spellings_as_flags_and_yaml_keys(synonym, field, value, expected, tmp_path):
    args = cli.make_parser().parse_args(["train", "--" + synonym.replace("_", "-"), value])
    assert getattr(cli.config_from_args(args), field) == expected
    path = tmp_path / "run.yaml"
    path.write_text(f"{synonym}: {value}\n")
    assert getattr(build_config({}, str(path)), field) == expected


def test_two_spellings_with_different_values_are_refused_naming_both(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--iters", "5", "--max-steps", "6"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: grpo-mlx train" in err and "--max-steps 6" in err and "--iters 5" in err
    path = tmp_path / "run.yaml"
    path.write_text("iters: 5\nlr: 1e-4\nmax_steps: 6\n")
    with pytest.raises(ConfigError, match=r"'iters' \(line 1\) = 5 and 'max_steps' \(line 3\) = 6"):
        load_yaml(path)
    path.write_text("iters: 5\nmax_steps: 5\n")  # one value twice is no contradiction
    assert load_yaml(path) == {"iters": 5}


def test_a_yaml_synonym_is_overridden_by_a_flag_as_any_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 6\n")
    assert build_config({"iters": 9}, str(path)).iters == 9


def test_trl_batch_size_is_refused_with_the_conversion(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nper_device_train_batch_size: 16\n")
    with pytest.raises(
        ConfigError, match=r"line 2.*counts completions.*batch_size = per_device_train_batch_size / num"
    ):
        load_yaml(path)
    with pytest.raises(SystemExit):
        cli.main(["train", "--per-device-train-batch-size", "16"])
    assert "counts prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["eval", "--max-tokenz", "5"], "--max-tokens"),
        (["fuse", "--adapter-path", "a", "--save-path", "b", "--uplod-repo", "x/y"], "--upload-repo"),
        (["bench", "--repeatz", "2"], "--repeats"),
        (["tui", "--lerning-rate", "1"], "--learning-rate"),
        (["train", "--num-generation", "4", "--bogus-flag"], None),
    ],
)
def test_a_wrong_flag_is_answered_by_its_own_subcommand(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: grpo-mlx {argv[0]} ")
    assert f"grpo-mlx {argv[0]}: error: unknown option {argv[-2] if suggestion else argv[-1]}" in err
    if suggestion:
        assert f"(did you mean {suggestion}?)" in err


def test_suggestions_come_from_the_subcommands_own_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--lerning-rate", "1"])  # a train flag: eval has none like it
    assert "did you mean" not in capsys.readouterr().err


def test_eval_and_fuse_take_mlx_lm_spellings():
    parser = cli.make_parser()
    assert parser.parse_args(["eval", "--max-tokens", "12"]).max_completion_length == 12
    assert parser.parse_args(["fuse", "--adapter-path", "a", "--save-path", "b", "--de-quantize"]).dequantize


def test_report_to_takes_mlx_lm_comma_lists_and_refuses_unknown_trackers():
    args = cli.make_parser().parse_args(["train", "--report-to", "wandb,TensorBoard"])
    assert cli.config_from_args(args).report_to == ["wandb", "tensorboard"]
    assert build_config({"report_to": "none"}).report_to == []
    with pytest.raises(ConfigError, match="'mlflow' is no tracker here; use wandb, trackio, tensorboard, swanlab"):
        build_config({"report_to": ["mlflow"]})


def test_push_to_hub_takes_a_repo_id_not_trls_boolean(tmp_path):
    assert build_config({"push_to_hub": "me/gsm8k-grpo"}).push_to_hub == "me/gsm8k-grpo"
    path = tmp_path / "run.yaml"
    path.write_text("push_to_hub: true\n")
    with pytest.raises(ConfigError, match="hub_model_id: X is push_to_hub: X here"):
        build_config({}, str(path))
    with pytest.raises(ConfigError, match="owner/name"):
        build_config({"push_to_hub": "me/two words"})


def test_stop_escapes_mean_the_same_on_the_command_line_and_in_yaml(tmp_path):
    from grpo_mlx.config import unescape

    assert unescape(r"\n") == "\n" and unescape(r"a\tb\r") == "a\tb\r"
    assert unescape(r"\\n") == "\\n", "a doubled backslash is one literal backslash"
    assert unescape(r"\d+") == r"\d+", "other backslashes stay as written"
    args = cli.make_parser().parse_args(["train", "--stop", r"\n", r"</answer>\\"])
    assert cli.config_from_args(args).stop == ["\n", "</answer>\\"]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("stop: ['\\n', \"\\n\\n\", ', ']\n")  # single-quoted: backslash n; double-quoted: newlines
    assert build_config({}, str(yaml_file)).stop == ["\n", "\n\n", ", "]
    yaml_file.write_text('stop: "\\n"\n')  # one string is one stop string, kept whole
    assert build_config({}, str(yaml_file)).stop == ["\n"]


def test_a_resumed_run_does_not_decode_its_stop_strings_again(tmp_path):
    import json

    from grpo_mlx.config import build_resumed_config, to_dict

    cfg = build_config({"stop": [r"\\n"], "adapter_path": str(tmp_path)})
    assert cfg.stop == ["\\n"]  # a literal backslash and n
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg)))
    assert build_resumed_config(str(tmp_path)).stop == ["\\n"]


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


def test_rollout_memory_flags_and_their_mlx_lm_names(tmp_path):
    args = cli.make_parser().parse_args(
        ["train", "--kv-bits", "8", "--kv-group-size", "32", "--rollout-batch-size", "5"]
    )
    cfg = cli.config_from_args(args)
    assert (cfg.kv_bits, cfg.kv_group_size, cfg.rollout_batch_size) == (8, 32, 5)
    cfg = build_config({"kv_bits": "4", "kv_group_size": "32", "rollout_batch_size": "16"})
    assert (cfg.kv_bits, cfg.kv_group_size, cfg.rollout_batch_size) == (4, 32, 16)
    assert (build_config({}).kv_bits, build_config({}).rollout_batch_size) == (None, None)  # off by default
    path = tmp_path / "run.yaml"
    path.write_text("kv_bits: 8\nquantized_kv_start: 100\n")  # mlx-lm's generate option, another meaning
    with pytest.raises(ConfigError, match="quantized_kv_start.*remove quantized_kv_start"):
        build_config({}, str(path))
    with pytest.raises(ConfigError, match="'kv_bits' = 7: must be one of 2, 3, 4, 5, 6, 8"):
        cli.config_from_args(cli.make_parser().parse_args(["train", "--kv-bits", "7"]))
