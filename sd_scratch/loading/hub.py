"""Hugging Face model ids: a checkpoint named by its repository, read from the local cache or downloaded.

    load_checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5")                  # a diffusers repository
    load_checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors")  # one file

A name is an id only when no file or folder of that name exists (a path on disk always wins) and it has an
id's form: OWNER/NAME, or OWNER/NAME/FILE with FILE a .safetensors or .ckpt file (in a subfolder or not).
huggingface_hub does the fetching: its cache (HF_HUB_CACHE, by default ~/.cache/huggingface/hub) keeps what
was downloaded, and with HF_HUB_OFFLINE=1 it is read without touching the network. Of a diffusers repository
only what loading reads is fetched: the networks' weights and configs, the tokenizers, the scheduler's
config (not the safety checker, not other variants); with fp16 asked, the `*.fp16.safetensors` variant where
the repository has one, half the download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sd_scratch.loading.model import CheckpointError

ID_PART = re.compile(r"[A-Za-z0-9][\w.-]*")  # an owner, a repository or a file name on the hub
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# What loading a diffusers folder reads (diffusers_folder.py): these, and each network's weights (by variant).
FOLDER_FILES = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/*",
                "text_encoder_2/config.json", "tokenizer_2/*", "scheduler/scheduler_config.json"]
FOLDER_WEIGHTS = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"]
# SDXL's second text encoder: the base has both, the refiner this one alone.
SDXL_WEIGHTS = ["text_encoder_2/model"]


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of OWNER/NAME (not ending in a weights suffix) or OWNER/NAME/.../FILE.safetensors.
    A missing local file such as weights/model.safetensors is not an id."""
    parts = name.split("/")
    if len(parts) < 2 or not all(ID_PART.fullmatch(part) for part in parts):
        return False
    names_a_file = parts[-1].endswith(SINGLE_FILE_SUFFIXES)
    return names_a_file if len(parts) > 2 else not names_a_file


def from_hub(name: str, fp16: bool = False) -> Path:
    """The local path of hub id `name`: the one file it names, or a snapshot folder of the diffusers repository
    holding what loading reads; from the cache when there (offline: only from there), else downloaded.

    fp16: take the repository's `*.fp16.safetensors` weights if it has them (else the full-precision ones).
    """
    # imported here, not at the top of the module: only ids need huggingface_hub
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    owner, repo_name, *in_repo = name.split("/")
    repo, offline = f"{owner}/{repo_name}", hub_offline()
    where = {"cache_dir": hub_cache(), "local_files_only": offline}
    try:
        if in_repo:
            return Path(hf_hub_download(repo, "/".join(in_repo), **where))
        for variant in (".fp16", "") if fp16 else ("",):
            weights, sdxl = ([f"{stem}{variant}.safetensors" for stem in stems] for stems in (FOLDER_WEIGHTS,
                                                                                              SDXL_WEIGHTS))
            folder = Path(snapshot_download(repo, allow_patterns=[*FOLDER_FILES, *weights, *sdxl], **where))
            if (folder / sdxl[0]).is_file():  # SDXL: the refiner has no text_encoder/
                weights = [file for file in weights if not file.startswith("text_encoder/")] + sdxl
            if all((folder / file).is_file() for file in weights):
                return folder
    except LocalEntryNotFoundError as error:
        raise CheckpointError(not_reachable(name, "HF_HUB_OFFLINE is set" if offline else first_line(error))) from None
    except GatedRepoError:
        raise CheckpointError(f"{repo} is a gated repository on the Hugging Face hub: accept its terms on its page "
                              "and log in (hf auth login), or download it and give its path") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name} is no file or folder here, nor a repository on the Hugging Face hub (or a "
                              "private one: log in with hf auth login)") from None
    except EntryNotFoundError:  # (on the hub: a local miss is a LocalEntryNotFoundError, above)
        raise CheckpointError(f"the Hugging Face repository {repo} has no file {'/'.join(in_repo)}") from None
    except (OSError, ValueError) as error:  # another answer of the hub (a server error, an id it refuses)
        raise CheckpointError(f"{name}: the Hugging Face hub answered {type(error).__name__}: "
                              f"{first_line(error)}") from None
    missing = ", ".join(file for file in weights if not (folder / file).is_file())
    if offline:
        raise CheckpointError(not_reachable(name, f"HF_HUB_OFFLINE is set and the cache lacks {missing}"))
    raise CheckpointError(f"{repo} on the Hugging Face hub gives no {missing} (or the hub could not be reached and "
                          "the cache lacks it): is it a diffusers Stable Diffusion 1.x/2.x or SDXL repository? For one "
                          f"file of a repository, name the file: {repo}/FILE.safetensors")


def not_reachable(name: str, reason: str) -> str:
    return (f"{name} is no file or folder here, and as a Hugging Face id it is not found locally and the hub cannot "
            f"be reached ({reason}): download it while online, or give a path")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now: huggingface_hub reads it once, when first imported, and a session may set it later."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache() -> str | None:
    """The cache folder, read now for the same reason: HF_HUB_CACHE, else HF_HOME/hub, else the hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
