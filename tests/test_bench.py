"""`grpo-mlx bench --quick`: every section runs and reports the figures the README quotes."""

import json
import subprocess
import sys

import pytest

from grpo_mlx import cli


def test_bench_module_imports_without_mlx():
    code = "import sys, grpo_mlx.bench; print('mlx.core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_quick_bench_on_the_demo(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    for heading in ("machine", "rollout", "train step", "log-prob pass", "OpenBLAS speed-up", "BatchGenerator"):
        assert heading in printed
    r = json.loads(path.read_text())
    m = r["machine"]
    assert m["matmul_gflops"] > 0 and m["bandwidth_gbs"]["ceiling"] > 0
    assert m["blas_probe"]["bundled_gflops"] > 0 and m["blas_probe"]["speedup"] > 0
    ro = r["rollout"]
    for name in ("grpo_mlx", "batch_generator"):
        assert ro[name]["generated"] == 2 * 2 * 8, "both generate the whole budget"
        assert ro[name]["decode_tok_s"] > 0 and ro[name]["prefill_tok_s"] > 0
    assert ro["decode_ratio"] > 0 and ro["decode_step"]["bandwidth_fraction"] > 0
    assert set(ro["sampling_ms"]) == {"mlx_lm_style", "mlx_eager", "mlx_compiled", "numpy_host"}
    tr = r["train"]
    for beta in ("beta_0", "beta_pos"):
        for phase in ("rollout", "rewards", "reference", "update"):  # Trainer.train_step's time/* phases
            assert tr[beta][phase] >= 0
        assert tr[beta]["step"] >= tr[beta]["rollout"] + tr[beta]["update"]
        assert tr[beta]["peak_gb"] > 0
    assert tr["beta_0"]["reference"] < tr["beta_pos"]["reference"], "beta = 0 runs no reference pass"
    assert tr["peak_ratio"] > 0 and tr["train_matmuls"]["gflops_6pt"] > 0
    lp = r["logprobs"]
    assert lp["chunked"]["peak_gb"] > 0 and lp["full_log_softmax_gb_at_64x512"] == pytest.approx(
        64 * 512 * 100 * 4 / 1e9
    )


def test_quick_bench_on_a_random_model(tmp_path):
    path = tmp_path / "bench.json"
    args = [
        "bench",
        "--quick",
        "--random",
        "tiny:num_hidden_layers=1",
        "--only",
        "rollout",
        "logprobs",
        "--json",
        str(path),
    ]
    assert cli.main(args) == 0
    r = json.loads(path.read_text())
    assert r["model"]["layers"] == 1 and r["model"]["vocab"] == 8192
    assert r["rollout"]["grpo_mlx"]["generated"] == r["rollout"]["batch_generator"]["generated"]
    assert "machine" in r and "matmul_gflops" not in r["machine"]


def test_unknown_random_architecture_is_one_sentence():
    from grpo_mlx.errors import UserError
    from grpo_mlx.testing import build_random_model

    with pytest.raises(UserError, match="no preset or mlx-lm architecture named 'nonsense'"):
        build_random_model("nonsense")


def test_whole_logits_are_skipped_when_they_would_not_fit(tmp_path, monkeypatch):
    """The baseline of the log-prob pass materialises (rows, V) logits; on a machine without
    room for them it is reported as skipped instead of being run into the OOM killer."""
    from grpo_mlx import bench

    rows, vocab = 256, 8192  # whole logits: 8.4 MB, needing about 29 MB
    monkeypatch.setattr(bench, "_available_memory", lambda: 40 * 2**20)  # 40 MB available
    path = tmp_path / "bench.json"
    args = [
        "bench",
        "--quick",
        "--random",
        "tiny:num_hidden_layers=1",
        "--only",
        "logprobs",
        "--logprob-rows",
        str(rows),
        "--json",
        str(path),
    ]
    assert cli.main(args) == 0
    lp = json.loads(path.read_text())["logprobs"]
    assert lp["vocab"] == vocab and "would need about" in lp["whole"]["skipped"]
    assert lp["chunked"]["peak_gb"] > 0

    monkeypatch.setattr(bench, "_available_memory", lambda: 8 * 2**30)  # 8 GB available: it runs
    assert cli.main(args) == 0
    assert json.loads(path.read_text())["logprobs"]["whole"]["peak_gb"] > 0


def test_rollout_memory_section_compares_the_cache_and_waves(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--only", "rollout-memory", "-G", "4", "--json", str(path)]) == 0
    assert "rollout memory" in capsys.readouterr().out
    v = json.loads(path.read_text())["rollout_memory"]["variants"]
    assert set(v) == {"full precision", "kv_bits 8", "kv_bits 4", "waves of 4", "waves of 2"}
    for name, row in v.items():
        assert row["generated"] == 2 * 4 * 8 and row["decode_tok_s"] > 0 and row["peak_gb"] > 0, name
    assert v["full precision"]["logp_diff_mean"] < 1e-5 and v["waves of 2"]["logp_diff_mean"] < 1e-5
    assert v["kv_bits 4"]["logp_diff_mean"] > v["kv_bits 8"]["logp_diff_mean"] > 1e-5, "the gap the cache adds"
