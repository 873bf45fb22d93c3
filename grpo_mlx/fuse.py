"""`grpo-mlx fuse`: adapters folded into the base weights, saved as a standalone mlx-lm model.

The result is an ordinary mlx-lm model directory (weights, config.json, tokenizer files) that
`mlx_lm.generate`, `mlx_lm.server` and `mlx_lm.load` use as they are, with no grpo-mlx installed.

Choices, stated once:
- The folding is mlx-lm's: each LoRA/DoRA layer's `fuse()` returns a plain (or quantized) layer
  with W + scale * B^T A^T, and `mlx_lm.utils.save` writes weights, config and tokenizer.
- Precision: the sum is formed in float32 (the dtype our CPU training computes in) and the
  fused model is saved in the base model's own dtype (bfloat16 stays bfloat16; the demo is
  float32), so the fused model is the size of the base. `--dtype` picks another.
- A quantized base stays quantized: the fused weights are quantized again with the base's group
  size and bits. That re-quantization is lossy (the adapters' change is rounded onto the 4-bit
  grid); `--dequantize` saves full-precision weights, exactly the trained policy.
- The model directory is written beside its destination and renamed into place, so a failure
  leaves no half-written model; an existing non-empty --save-path is refused, never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

HELP = "Fuse adapters into the base model: a standalone model for mlx_lm.generate and mlx_lm.server."

DTYPES = ("float16", "bfloat16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="Base model directory or Hugging Face repo id. Default: the "
        "model named in the adapters' adapter_config.json.",
    )
    parser.add_argument(
        "--adapter-path",
        required=True,
        help="Adapters: a grpo-mlx run directory (or a checkpoint in it), or any mlx-lm adapter directory.",
    )
    parser.add_argument("--save-path", required=True, help="New directory for the fused model.")
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="Save full-precision weights for a quantized base (default: quantize the fused weights like the base).",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype of the saved floating-point weights. Default: the base model's.",
    )
    parser.add_synonym("--de-quantize", "--dequantize")  # mlx_lm.fuse's spelling
    parser.add_argument(
        "--upload-repo",
        metavar="OWNER/NAME",
        help="Upload the fused model with a model card to this Hugging Face repo (needs a token: hf auth login).",
    )
    parser.add_argument(
        "--hf-path",
        metavar="OWNER/NAME",
        help="The base model's Hugging Face repo id, for the model card when --model is a local directory.",
    )
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks on errors.")


def read_adapter_config(adapter_path: str | os.PathLike) -> dict:
    folder = Path(adapter_path).expanduser()
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"--adapter-path {adapter_path}: no {name} there; is it a run directory (or checkpoints/step_N in one)?"
            )
    return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))


def main_dtype(model):
    """The floating-point dtype holding most of the model's parameters (the stored dtype)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    sizes = Counter()
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            sizes[p.dtype] += p.size
    return sizes.most_common(1)[0][0] if sizes else mx.float32


def fuse_adapters(model, dequantize: bool = False) -> int:
    """Replace every adapter layer of `model` by its fused layer (mlx-lm's `fuse()`); return how
    many were fused."""
    from mlx.utils import tree_unflatten

    fused = [
        (name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules() if hasattr(module, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def local_model_dir(model: str) -> Path:
    """A local directory for a model path or a (downloaded) hub id: `save` copies extra files
    such as generation_config.json from it."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    from mlx_lm.utils import hf_repo_to_path

    return hf_repo_to_path(model)


def fuse_model(
    model: str, adapter_path: str, save_path: str, dequantize: bool = False, dtype: str | None = None
) -> dict:
    """Load `model`, apply and fuse the adapters at `adapter_path`, save to `save_path`.
    Returns what was done: layers fused, dtype, whether the result is quantized."""
    from grpo_mlx.config import ConfigError

    save_path = Path(save_path).expanduser()
    if save_path.exists() and (not save_path.is_dir() or any(save_path.iterdir())):
        raise ConfigError(f"--save-path {save_path} exists and is not empty; remove it or choose a new directory")
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, save

    from grpo_mlx.policy import ModelLoadError

    try:
        base, tokenizer, config = load(model, return_config=True)
    except Exception as e:  # mlx-lm raises a mix of types for bad dirs, bad ids and no network
        raise ModelLoadError(f"cannot load model '{model}': {type(e).__name__}: {e}") from None
    target = getattr(mx, dtype) if dtype else main_dtype(base)
    base.set_dtype(mx.float32)  # fuse in float32; quantized weights (integers) are untouched
    try:
        load_adapters(base, str(adapter_path))
    except ValueError as e:  # adapters made for another model: names or shapes differ
        raise ModelLoadError(f"the adapters in {adapter_path} do not fit '{model}': {e}") from None
    count = fuse_adapters(base, dequantize=dequantize)
    if count == 0:
        raise ModelLoadError(f"no adapter layers in the model after loading {adapter_path}")
    if dequantize:
        base = dequantize_model(base)  # layers without adapters too (embeddings, lm_head)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    base.set_dtype(target)
    if dtype:
        config["torch_dtype"] = dtype

    tmp = save_path.with_name(f".{save_path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp, local_model_dir(model), base, tokenizer, config, donate_model=False)
        if save_path.exists():
            save_path.rmdir()  # empty (checked above)
        os.replace(tmp, save_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "layers_fused": count,
        "dtype": str(target).replace("mlx.core.", ""),
        "quantized": "quantization" in config,
        "save_path": str(save_path),
    }


def run(args: argparse.Namespace) -> int:
    from grpo_mlx.config import ConfigError

    adapter_config = read_adapter_config(args.adapter_path)
    model = args.model or adapter_config.get("model")
    if not model:
        raise ConfigError(f"{args.adapter_path}/adapter_config.json names no base model; pass --model")
    from grpo_mlx.blas import use_system_blas

    if args.upload_repo:  # before the work, not after it
        from grpo_mlx import hub

        hub.check_token(args.upload_repo, "nothing was fused")
    use_system_blas()
    print(f"grpo-mlx fuse: {model} + adapters {args.adapter_path}", file=sys.stderr)
    info = fuse_model(model, args.adapter_path, args.save_path, args.dequantize, args.dtype)
    if args.upload_repo:
        url = hub.push_fused(info["save_path"], args.upload_repo, args.hf_path or model, args.adapter_path)
        print(f"uploaded to {url}", file=sys.stderr)
    kind = "quantized" if info["quantized"] else info["dtype"]
    print(
        f"fused {info['layers_fused']} adapter layers; {kind} model written to {info['save_path']}\n"
        f"  try: mlx_lm.generate --model {info['save_path']} --prompt '...'\n"
        f"       mlx_lm.server --model {info['save_path']} --port 8080",
        file=sys.stderr,
    )
    return 0
