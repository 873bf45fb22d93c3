"""The memory planner: predictions held to measured peaks of real training steps, its JSON,
the refusal of a run that does not fit before any weight loads, the override, the dry-run
section, and the suggested fixes fitting when predicted again."""

import json

import pytest

from grpo_mlx import cli, plan, plan_check
from grpo_mlx.config import DEMO_DATA, build_config
from grpo_mlx.testing import PRESETS, save_tokenizer_dir

# a 72B-like float32 model: far more than any test machine has
HUGE = {"model_type": "qwen2", **PRESETS["qwen2.5-1.5b"][1], "hidden_size": 8192, "intermediate_size": 29568,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8}  # fmt: skip


def huge_model_dir(tmp_path):
    path = tmp_path / "huge"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(HUGE), encoding="utf-8")
    return str(path)  # no weights, no tokenizer


@pytest.mark.parametrize(
    "shape", plan_check.GRID[:4], ids=["small-vocab", "49k-vocab", "4-micro-batches", "grad-checkpoint"]
)
def test_prediction_is_within_15_percent_of_a_measured_step(shape):
    measured = plan_check.measure(*shape)
    assert 0.85 <= plan_check.predicted(*shape) / measured <= 1.15


def test_json_has_the_total_and_the_parts(capsys):
    assert cli.main(["plan", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted_peak_bytes"] == pytest.approx(
        out["parts_bytes"]["weights"] + out["parts_bytes"]["adapters_and_optimizer"]
        + max(out["parts_bytes"]["kv_cache"] + out["parts_bytes"]["decode_activations"],
              out["parts_bytes"]["reference_pass"],
              out["parts_bytes"]["training_activations"] + out["parts_bytes"]["logprob_pass"]), abs=2)  # fmt: skip
    assert out["budget_bytes"] > 0 and out["fits"] is True and out["fixes"] == []


def test_a_run_that_cannot_fit_is_refused_by_the_planner_before_weights_load(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--model", huge_model_dir(tmp_path), "--data", DEMO_DATA, "--iters", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "predicted to need" in err and "--ignore-memory-plan" in err  # the planner's sentence, not a load error
    assert not (tmp_path / "runs").exists()


def test_the_override_goes_on_to_load_the_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--model", huge_model_dir(tmp_path), "--data", DEMO_DATA, "--iters", "1",
                     "--ignore-memory-plan"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "does NOT fit" in err  # the plan was shown
    assert "predicted to need" not in err and "cannot load model" in err  # and loading was tried


def test_dry_run_shows_the_plan(tmp_path, monkeypatch, capsys):
    model = save_tokenizer_dir(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama", **PRESETS["tiny"][1]}))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--dry-run", "--model", model, "--data", DEMO_DATA]) == 0
    out = capsys.readouterr().out
    assert "memory plan: predicted peak" in out and "kv cache" in out


def test_every_suggested_fix_fits_when_predicted_again():
    config = {"model_type": "qwen2", **PRESETS["qwen2.5-1.5b"][1]}
    cfg = build_config({"data": DEMO_DATA, "model": "x/y", "batch_size": 8, "group_size": 16,
                        "max_completion_length": 1024})  # fmt: skip
    full = plan.predict(cfg, config, 200, 2)["total"]
    budget = int(full * 0.7)
    p = plan.make_plan(cfg, config, prompt_len=200, budget=budget, fb=2)  # bf16, as on a Mac
    assert not p.fits and p.fixes
    suggested = {f["change"] for f in p.fixes}
    for text, changes, model_changes in plan.candidate_changes(cfg, config):
        again = plan.predict(plan.with_changes(cfg, changes), {**config, **model_changes}, 200, 2)["total"]
        assert (again <= budget) == (text in suggested), text  # every fit suggested, every suggestion fits
    assert plan.predict(cfg, config, 200, 2)["total"] == full  # the changes were made on copies


def test_the_demo_is_never_refused(capsys):
    cfg = build_config({})
    assert plan.check_run(cfg) is not None  # fits, and prints
    assert "memory plan" in capsys.readouterr().err


def test_a_model_without_a_config_here_is_not_refused_for_it(tmp_path, capsys):
    """A Hub id not downloaded yet (its config comes with the weights) or a wrong path (the
    loader names it): no plan, one line saying why, and the run goes on to the loader."""
    for model in ("someone/not-downloaded-yet", str(tmp_path)):
        cfg = build_config({"data": DEMO_DATA, "model": model})
        assert plan.check_run(cfg) is None
        assert "memory plan: none (" in capsys.readouterr().err
