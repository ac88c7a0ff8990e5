"""``medmvl download REPO_ID``: the one command that uses the network (Hugging Face hub)."""

from __future__ import annotations

import argparse

NAME = "download"
HELP = "download a released checkpoint from the Hugging Face hub (resumable; the only network use)"
EXAMPLES = ("medmvl download shiym2000/MedM-VL-CT-Chest-3B-en --local-dir ~/models/MedM-VL-CT-Chest-3B-en",)
DOCS = "docs/models.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", help="hub repository, e.g. shiym2000/MedM-VL-CT-Chest-3B-en")
    parser.add_argument("--local-dir", default=None,
                        help="folder to put the files in (default: the Hugging Face cache)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--token", default=None, help="hub token for gated repositories (default: HF_TOKEN / login)")


def run(args: argparse.Namespace) -> int:
    import os

    from medmvl_core.errors import CheckpointError

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError("HF_HUB_OFFLINE is set; unset it to download (this command needs the network)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a dependency
        raise CheckpointError("huggingface_hub is not installed; pip install huggingface_hub") from exc
    # Only weights in safetensors, configs, tokenizer files and docs: never pickles.
    allow = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.md", "*.py.txt"]
    try:
        path = snapshot_download(repo_id=args.repo_id, revision=args.revision, local_dir=args.local_dir,
                                 allow_patterns=allow, token=args.token)
    except Exception as exc:  # network, auth, unknown repo: one clear line
        raise CheckpointError(f"download of {args.repo_id} failed: {exc}; check the repo id, the network "
                              "and, for gated repositories, your token (huggingface-cli login)") from exc
    print(path)
    return 0
