"""Models from a hub: Hugging Face (huggingface_hub) or ModelScope (modelscope), as SGLang does.

`find_cached` looks in the hub's local cache without any network call (both hubs' layouts: the
`models--org--name/snapshots/<rev>` cache and ModelScope's older flat `org/name` one), so `--model-path org/name`
works offline once the model was downloaded. `download` fetches what is missing, with the hub client's own
progress bars and resume of partial files. ModelScope is chosen by `hub="modelscope"` or by
EMBER_USE_MODELSCOPE / SGLANG_USE_MODELSCOPE in the environment.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger("ember.loader")

HUBS = ("huggingface", "modelscope")
# "name" or "org/name" as the hubs spell repo ids.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# what serving needs: configs, tokenizer files, templates, remote code; plus the weights (chosen below)
ALLOW = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def default_hub() -> str:
    on = ("1", "true", "yes")
    use_ms = os.environ.get("EMBER_USE_MODELSCOPE", "").lower() in on or \
        os.environ.get("SGLANG_USE_MODELSCOPE", "").lower() in on
    return "modelscope" if use_ms else "huggingface"


def _check(repo_id: str, hub: str) -> None:
    if hub not in HUBS:
        raise ValueError(f"unknown hub {hub!r} (choose from {', '.join(HUBS)})")
    if not REPO_ID.match(repo_id) or repo_id.startswith((".", "~")):
        raise ValueError(f"{repo_id!r} is not a valid repo id (org/name)")


def find_cached(repo_id: str, hub: str | None = None, revision: str | None = None) -> Path | None:
    """The local snapshot of `repo_id` if the hub's cache holds one (no network), else None."""
    hub = hub or default_hub()
    _check(repo_id, hub)
    try:
        if hub == "modelscope":
            from modelscope import snapshot_download
        else:
            from huggingface_hub import snapshot_download
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - each client has its own "not in the cache" errors
        return None
    return path if (path / "config.json").is_file() or any(path.glob("*.gguf")) else None


def download(repo_id: str, hub: str | None = None, revision: str | None = None,
             local_dir: str | os.PathLike | None = None) -> Path:
    """Fetch `repo_id` (config, tokenizer and weight files) into the hub's cache or `local_dir`; partial files
    resume. Raises ValueError with the hub's reason when it cannot."""
    hub = hub or default_hub()
    _check(repo_id, hub)
    local = None if local_dir is None else str(local_dir)
    try:
        if hub == "modelscope":
            from modelscope import snapshot_download as ms_download
            path = ms_download(repo_id, revision=revision, local_dir=local,
                               allow_patterns=ALLOW + ["*.safetensors", "*.bin", "*.gguf"])
        else:
            from huggingface_hub import list_repo_files, snapshot_download
            try:  # weights: safetensors if the repo has them, else pytorch .bin (never both)
                files = list_repo_files(repo_id, revision=revision)
                weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
            except Exception:  # noqa: BLE001 - let snapshot_download report the real error
                weights = "*.safetensors"
            path = snapshot_download(repo_id, revision=revision, local_dir=local, allow_patterns=ALLOW + [weights])
    except ImportError as e:
        raise ValueError(f"the {hub} client is not installed ({e}); pip install "
                         f"{'modelscope' if hub == 'modelscope' else 'huggingface_hub'}") from e
    except Exception as e:  # noqa: BLE001 - network errors, missing or gated repos...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"could not fetch {repo_id!r} from {hub}: {type(e).__name__}: {first}") from e
    return Path(path)
