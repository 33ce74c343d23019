"""A model named by its Hugging Face id (`HuggingFaceTB/SmolLM2-135M-Instruct`), as vLLM takes one: its files from
the Hugging Face cache, downloaded into it where the network allows and HF_HUB_OFFLINE is not set (huggingface_hub
does both, and reads HF_HOME, HF_HUB_CACHE and HF_TOKEN as it always does)."""
from __future__ import annotations

import re
from pathlib import Path

from engine.errors import CheckpointError

# What serving a checkpoint reads: its configs, weights, tokenizer and chat template; never other formats' weights.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
TOKENIZER_FILES = ["*.json", "*.jinja", "tokenizer*", "*.txt", "*.model"]  # --tokenizer: no weights
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face id (owner/name) rather than a path on this machine (one that names a
    GGUF file is a path, there or not)."""
    return bool(_REPO_ID.match(name)) and not name.endswith(".gguf") and not Path(name).expanduser().exists()


def resolve_model(name: str | Path, files: list[str] = CHECKPOINT_FILES) -> Path:
    """The checkpoint directory or GGUF file `name` means: a path as given, else a Hugging Face id's snapshot (of
    `files`)."""
    path = Path(name).expanduser()
    if path.exists() or not is_repo_id(str(name)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(str(name), allow_patterns=files))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name}: no such path here, and no such model on the Hugging Face Hub (or it needs a "
                              "token, HF_TOKEN, this machine lacks)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{name}: no such path here, nor in the Hugging Face cache, and it cannot be downloaded "
                              "(HF_HUB_OFFLINE is set, or the Hub cannot be reached); download it where the network "
                              "allows, or give a checkpoint directory or GGUF file") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{name}: cannot be fetched from the Hugging Face Hub: {e}") from None
