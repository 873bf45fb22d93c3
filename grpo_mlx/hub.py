"""Sharing on the Hugging Face Hub: `train --push-to-hub owner/name` (the adapters) and
`fuse --upload-repo owner/name` (the fused model), each with a model card.

The card follows mlx-lm's conventions (mlx_lm.utils.create_model_card / upload_to_hub):
library_name mlx, pipeline_tag text-generation, the tag mlx, base_model, and a "Use with mlx"
snippet; to these it adds what the run did: the rewards and the run's figures (last step's
reward, held-out accuracy before and after) from metrics.jsonl. No MLX import here.

The upload is huggingface-hub's create_repo + upload_folder. Without a token the command stops
before any work with one sentence; a failed upload is one sentence and a non-zero exit, and the
local files stay where they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from grpo_mlx.errors import UserError

# what an adapter repo holds: enough for mlx_lm.load(base, adapter_path=...) and the record;
# the run's config.json is left out (the Hub would read it as a model's config)
ADAPTER_FILES = ["adapters.safetensors", "adapter_config.json", "README.md", "metrics.jsonl", "summary.json"]


class HubError(UserError, RuntimeError):
    """No token, or the Hub refused or could not be reached."""


def check_token(repo: str, kept: str) -> None:
    from huggingface_hub import get_token

    if not get_token():
        raise HubError(f"cannot upload to {repo}: no Hugging Face token (run `hf auth login` or set HF_TOKEN); {kept}")


def run_figures(run_dir: str | Path) -> dict:
    """The figures a card shows, from a run directory's metrics.jsonl ({} without one)."""
    from grpo_mlx.events import read_jsonl

    figures: dict = {}
    for event in read_jsonl(str(Path(run_dir) / "metrics.jsonl")):
        if event.get("type") == "step" and "reward" in event.get("metrics", {}):
            figures["steps"], figures["final_reward"] = event["step"], event["metrics"]["reward"]
        elif event.get("type") == "eval" and event.get("name") in ("before", "after"):
            for key in ("accuracy", "mean_reward"):
                if key in event["metrics"]:
                    figures[f"{key}_{event['name']}"] = event["metrics"][key]
    return figures


def is_hub_id(model: str | None) -> bool:
    return bool(model) and not Path(model).expanduser().exists() and model.count("/") == 1


def model_card(repo: str, base_model: str | None, config: dict, figures: dict, fused: bool):
    """A huggingface_hub ModelCard for the adapters (`fused` False) or the fused model."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["mlx", "grpo", "grpo-mlx"] + ([] if fused else [config.get("fine_tune_type", "lora")])
    data = ModelCardData(library_name="mlx", pipeline_tag="text-generation", tags=tags)
    if is_hub_id(base_model):
        data.base_model = base_model
    base = f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model) else f"`{base_model}`"
    rewards = ", ".join(f"`{r}`" for r in config.get("reward_functions", [])) or "(not recorded)"
    lines = [f"# {repo}", ""]
    what = "A model fused from" if fused else f"{config.get('fine_tune_type', 'lora').upper()} adapters for"
    lines += [f"{what} {base}, trained with GRPO by grpo-mlx on MLX.", "", f"- rewards: {rewards}"]
    if config:
        lines.append(
            f"- {config.get('iters')} steps of {config.get('batch_size')} prompts x {config.get('group_size')} "
            f"completions, loss {config.get('loss_type')}, beta {config.get('beta')}, "
            f"learning rate {config.get('learning_rate')}"
        )
    if "final_reward" in figures:
        lines.append(f"- reward at the last step ({figures['steps']}): {figures['final_reward']:.3f}")
    if "accuracy_after" in figures:
        before = f"{figures['accuracy_before']:.1%} -> " if "accuracy_before" in figures else ""
        lines.append(f"- held-out accuracy (greedy): {before}{figures['accuracy_after']:.1%}")
    load = f'load("{repo}")' if fused else f'load("{base_model}", adapter_path=snapshot_download("{repo}"))'
    imports = "from mlx_lm import load, generate" + ("" if fused else "\nfrom huggingface_hub import snapshot_download")
    lines += ["", "## Use with mlx", "", "```bash", "pip install mlx-lm", "```", "", "```python", imports, ""]
    lines += [f"model, tokenizer = {load}", 'messages = [{"role": "user", "content": "hello"}]']
    lines += ["prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)"]
    lines += ["print(generate(model, tokenizer, prompt=prompt))", "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def upload(folder: str | Path, repo: str, card, allow_patterns: list[str] | None = None, api=None) -> str:
    """Write the card as README.md into `folder`, then create the repo and upload; the URL."""
    from huggingface_hub import HfApi

    card.save(str(Path(folder) / "README.md"))
    api = api or HfApi()
    try:
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo,
            repo_type="model",
            allow_patterns=allow_patterns,
            commit_message="Upload with grpo-mlx",
        )
    except Exception as e:  # httpx/requests errors, HfHubHTTPError, an offline hub: all one sentence
        raise HubError(f"cannot upload {folder} to {repo}: {type(e).__name__}: {e}; the local files are kept") from None
    return f"https://huggingface.co/{repo}"


def push_adapters(run_dir: str | Path, repo: str, api=None) -> str:
    """The run's final adapters, its record and a card, to `repo`."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    card = model_card(repo, config.get("model"), config, run_figures(run_dir), fused=False)
    return upload(run_dir, repo, card, allow_patterns=ADAPTER_FILES, api=api)


def run_dir_of(adapter_path: str | Path) -> Path:
    """The run directory of adapters given as the run or as checkpoints/step_N in it."""
    path = Path(adapter_path).expanduser()
    return path.parent.parent if path.parent.name == "checkpoints" else path


def push_fused(save_path: str | Path, repo: str, base_model: str, adapter_path: str | Path, api=None) -> str:
    """A fused model directory and a card naming its base and the run that trained it."""
    run = run_dir_of(adapter_path)
    config_path = run / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    card = model_card(repo, base_model, config, run_figures(run), fused=True)
    return upload(save_path, repo, card, api=api)
