"""Where the policy comes from: a local directory holding what a model needs, or a hub repository we can reach
or have cached. Checked before anything is loaded, so a typo or an unreachable hub fails at once, naming the path.

**Local or hub id?** ``model.init_args.policy.path`` is local when it exists, or when it cannot be a hub id: it
starts with ``.``, ``/`` or ``~``; holds a backslash; does not have exactly one ``/`` (hub ids are ``org/name``);
has characters a hub id cannot (``huggingface_hub.utils.validate_repo_id``); or its first component is a local
directory (``runs/tiyn`` with ``runs/`` here is a typo, not the hub repository ``runs/tiyn``). A local path that
does not exist fails, naming it and the closest existing name.

**A local directory** needs ``config.json`` (or a PEFT ``adapter_config.json``), tokenizer files
(``tokenizer.json``, or a vocabulary such as ``tokenizer.model`` or ``vocab.json``; not checked with
``trust_remote_code``, whose tokenizer may read anything) and, to load the model, weights (``model.safetensors``,
``pytorch_model.bin``, their sharded ``*.index.json``, or adapter weights). The error lists what is missing and
what the directory holds.

**A hub id** is probed with one metadata request without retries: huggingface_hub retries each file download
for about 25 s when it cannot connect, and transformers asks for several files before it falls back to the cache,
so an unreachable hub cost minutes before a connection error that never named the path. Unreachable but cached:
loaded from the cache (``local_files_only``), with a warning. Not found, or unreachable and not cached: refused.
With ``HF_HUB_OFFLINE=1`` nothing is probed and only the cache counts.
"""

from __future__ import annotations

import difflib
import itertools
import warnings
from pathlib import Path
from typing import Literal

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from spiral_lit.errors import PathNotFoundError, UserError

WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)  # fmt: skip
"""What ``from_pretrained`` reads weights from (transformers 5 reads no TensorFlow or Flax weights)."""
TOKENIZER_PATTERNS = ("tokenizer.json", "*.model", "vocab*", "merges.txt", "*.tiktoken", "tekken.json", "*.vocab")
"""A fast tokenizer's ``tokenizer.json`` or a vocabulary a slow one (sentencepiece, BPE, WordPiece, tiktoken) reads."""
PROBE_TIMEOUT_S = 10.0
HINT = (
    "Build the quickstart's tiny model with `python -m spiral_lit tiny --out DIR`, or run the stage that exports "
    "it first (a run's hf/ directory)"
)


class ModelPathError(PathNotFoundError):
    """A model path that does not exist: the project's missing-path error, which callers catch as either."""


def looks_local(path: str) -> bool:
    """True when ``path`` is a local path, not a hub id (module docstring)."""
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") != 1:
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return Path(path.split("/")[0]).is_dir()


def _did_you_mean(path: str) -> str:
    """``; did you mean 'x'?`` for the existing name closest to the first missing component of ``path``, else ``.``
    (either ends the sentence that names the path)."""
    parts = Path(path).parts
    for depth in range(len(parts) - 1, -1, -1):
        parent = Path(*parts[:depth])
        if parent.expanduser().is_dir():
            break
    try:
        names = [p.name for p in itertools.islice(parent.expanduser().iterdir(), 10_000) if p.is_dir()]
    except OSError:
        return "."
    match = difflib.get_close_matches(parts[depth], names, n=1)
    if not match:
        return "."
    guess = Path(*parts[:depth], match[0], *parts[depth + 1 :])
    if not guess.expanduser().is_dir():
        guess = Path(*parts[:depth], match[0])
    return f"; did you mean {str(guess)!r}?"


def check_local_path(path: str, key: str) -> None:
    """Raise unless ``path`` is an existing directory."""
    directory = Path(path).expanduser()
    if directory.is_dir():
        return
    if directory.exists():
        raise UserError(
            f"{key}={path!r} is a file, not a directory: give the directory written by save_pretrained "
            f"(the one holding config.json). {HINT}"
        )
    raise ModelPathError(
        f"{key}={path!r} does not exist{_did_you_mean(path)} It was read as a local path, not a hub id: hub ids "
        "look like 'org/name', and a path starting with '.', '/' or '~', or whose first directory exists here, is "
        f"local. {HINT}"
    )


def check_policy_dir(directory: Path, key: str, tokenizer: bool, model: bool, trust_remote_code: bool) -> None:
    """Raise, listing what is missing and what is there, unless ``directory`` holds the tokenizer files (with
    ``tokenizer``) and the model's config and weights (with ``model``)."""
    names = sorted(p.name for p in directory.iterdir())
    missing = []
    if model and CONFIG_NAME not in names and ADAPTER_CONFIG_NAME not in names:
        missing.append(f"no {CONFIG_NAME} (nor {ADAPTER_CONFIG_NAME}), so it is not a model directory")
    has_vocabulary = any(next(directory.glob(pattern), None) for pattern in TOKENIZER_PATTERNS)
    if tokenizer and not trust_remote_code and not has_vocabulary:
        missing.append(
            "no tokenizer files: expected tokenizer.json (a fast tokenizer), or tokenizer_config.json with a "
            "vocabulary (tokenizer.model, vocab.json + merges.txt, vocab.txt, *.tiktoken)"
        )
    if model and not any(name in names for name in WEIGHT_FILES):
        missing.append(f"no weights: expected {', '.join(WEIGHT_FILES[:-2])} or adapter weights")
    if missing:
        raise UserError(
            f"{key}={str(directory)!r} is not a complete model directory: {'; '.join(missing)}. It holds: "
            f"{', '.join(names) or 'nothing'}. Give the directory written by save_pretrained. {HINT}"
        )


def _cached(repo_id: str, revision: str | None) -> bool:
    """Whether the hub cache holds the repository's config at ``revision``."""
    return any(
        isinstance(huggingface_hub.try_to_load_from_cache(repo_id, name, revision=revision), str)
        for name in (CONFIG_NAME, ADAPTER_CONFIG_NAME)
    )


def hub_access(repo_id: str, revision: str | None, key: str) -> Literal["hub", "cached_only"]:
    """How to load the hub repository ``repo_id``: from the hub, or from the cache only; raises if neither works."""
    cached = _cached(repo_id, revision)
    if hub_constants.HF_HUB_OFFLINE:
        if not cached:
            raise UserError(
                f"{key}={repo_id!r}: HF_HUB_OFFLINE is set and this hub id is not in the local cache "
                f"({hub_constants.HF_HUB_CACHE}). Download it where the hub is reachable (`hf download {repo_id}`), "
                "unset HF_HUB_OFFLINE, or give a local directory"
            )
        return "hub"  # transformers reads the cache itself in offline mode
    revision_key = f"{key.rsplit('.', 1)[0]}.revision"
    try:
        huggingface_hub.HfApi().model_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except RevisionNotFoundError as error:
        raise UserError(
            f"{revision_key}={revision!r}: no such branch, tag or commit in the hub repository {repo_id!r}"
        ) from error
    except (GatedRepoError, RepositoryNotFoundError) as error:
        raise UserError(
            f"{key}={repo_id!r} is not a local directory, and no hub repository of that name is visible to you "
            f"(the hub answered: {str(error).splitlines()[0]}). Check the spelling; a private or gated repository "
            "needs `hf auth login` (or HF_TOKEN) and, for a gated one, its terms accepted on its page"
        ) from error
    except HfHubHTTPError:
        return "hub"  # the hub answered (rate limit, server error): transformers reports it
    except Exception as error:  # any transport failure (DNS, refused, timeout, proxy): unreachable
        if cached:
            warnings.warn(
                f"{key}={repo_id!r}: cannot reach the hub ({error}); loading the cached copy without asking the "
                "hub again (set HF_HUB_OFFLINE=1 to skip this check)",
                UserWarning,
                stacklevel=1,  # one location, so Python shows it once however often the path is checked
            )
            return "cached_only"
        raise UserError(
            f"{key}={repo_id!r} is not a local directory, and we cannot reach the Hugging Face hub "
            f"({hub_constants.ENDPOINT}: {error}) and the local cache does not hold it. If it is a local path, "
            "check the spelling (write it as ./org/name to be unambiguous); otherwise download it where the hub is "
            f"reachable (`hf download {repo_id}`) and set HF_HUB_OFFLINE=1, or give a local directory"
        ) from error
    return "hub"
