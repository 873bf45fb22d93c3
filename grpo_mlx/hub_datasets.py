"""Hub datasets: a dataset id -> its files -> examples, through the Hugging Face cache.

Offline (HF_HUB_OFFLINE, or the Hub unreachable), a Hub id loads from the cache or fails at once
in one sentence: huggingface_hub retries a refused connection five times with backoff, about
half a minute per request, which reads as a hang to someone starting a run.
"""

from __future__ import annotations

from pathlib import Path

from grpo_mlx.data import DataError, read_rows, require_pyarrow, split_files, to_examples


def hub_unreachable(repo_id: str, kind: str = "datasets") -> str | None:
    """Why the Hub cannot be asked about `repo_id` (of `kind` datasets or models) right now
    (offline mode, no connection), or None. One request without retries, so that offline costs
    a second, not half a minute."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.get_session().head(f"{constants.ENDPOINT}/api/{kind}/{repo_id}", timeout=5)
    except Exception as error:  # httpx's connect / timeout errors: no answer at all
        return f"cannot reach {constants.ENDPOINT} ({type(error).__name__})"
    return None


def hub_files(repo_id: str) -> tuple[list[str], bool]:
    """The files of a Hub dataset and whether they come from the local cache (offline)."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    hint = "pass a local --data file or directory, or run once online to fill the cache"
    offline = hub_unreachable(repo_id)
    if offline is None:
        try:
            return huggingface_hub.HfApi().list_repo_files(repo_id, repo_type="dataset"), False
        except RepositoryNotFoundError:
            raise DataError(
                f"Hub dataset '{repo_id}': not found (nor a local path of that name); a private one "
                "needs `hf auth login`"
            ) from None
        except Exception as error:
            offline = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    try:  # a dataset downloaded before still loads from the cache
        cached = Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception:
        raise DataError(
            f"Hub dataset '{repo_id}': the Hub is unreachable ({offline}) and the dataset is not in the "
            f"local cache; {hint}"
        ) from None
    return [p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()], True


def load_hub_dataset(
    repo_id: str,
    split: str,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    required: bool = True,
    config: str | None = None,
) -> list[dict]:
    """Examples of one split of a Hugging Face Hub dataset (downloaded into the HF cache)."""
    import huggingface_hub

    filenames, offline = hub_files(repo_id)
    files = split_files(filenames, split, config, where=f"Hub dataset '{repo_id}'")
    if not files:
        if not required:
            return []
        shown = ", ".join(sorted(filenames)[:20]) + (" ..." if len(filenames) > 20 else "")
        raise DataError(
            f"Hub dataset '{repo_id}': no files for the {split} split "
            f"(looked for {split}.jsonl, data/{split}-*.jsonl, {split}.json, "
            f"parquet); the repo has: {shown}"
        )
    if any(f.endswith(".parquet") for f in files):
        require_pyarrow(f"{repo_id}/{files[0]}")  # before downloading gigabytes we cannot read
    rows = []
    for filename in files:
        try:
            local = huggingface_hub.hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=offline)
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise DataError(
                f"Hub dataset '{repo_id}': downloading {filename} failed ({type(error).__name__}: {first}); "
                "offline? pass a local --data directory"
            ) from None
        rows += read_rows(Path(local))
    examples = to_examples(rows, prompt_key, answer_key)
    if not examples and required:
        raise DataError(f"Hub dataset '{repo_id}': the {split} split has no examples")
    return examples
