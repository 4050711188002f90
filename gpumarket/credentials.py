"""The requester's saved login: which platform, and the API key the CLI calls it with.

Kept in the user's config dir (`GPUMARKET_CONFIG_DIR` to move it), readable by the user
alone. `GPUMARKET_API` and `GPUMARKET_API_KEY` override the file, for scripts and CI.
"""

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import platformdirs

FILE_NAME = "credentials.json"
# What `gpumarket up` serves.
DEFAULT_API = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Credentials:
    api: str
    api_key: str
    # The key's id, so `logout` can revoke it (unknown when it came from the environment).
    key_id: str | None = None
    email: str | None = None


def config_dir() -> Path:
    override = os.environ.get("GPUMARKET_CONFIG_DIR")
    return Path(override) if override else Path(platformdirs.user_config_dir("gpumarket"))


def path() -> Path:
    return config_dir() / FILE_NAME


def load() -> Credentials | None:
    """The environment's credentials, else the saved ones, else None."""
    saved = _read()
    api = os.environ.get("GPUMARKET_API")
    key = os.environ.get("GPUMARKET_API_KEY")
    if key:
        return Credentials(api=api or (saved.api if saved else DEFAULT_API), api_key=key)
    if saved is None:
        return None
    return replace(saved, api=api) if api else saved


def _read() -> Credentials | None:
    try:
        data = json.loads(path().read_text())
        return Credentials(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise CredentialsError(
            f"{path()} is damaged ({exc}); run `gpumarket login` again"
        ) from None


def save(credentials: Credentials) -> Path:
    """Written to a new file opened 0600 (never a moment world-readable), then renamed."""
    target = path()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = target.with_name(f".{FILE_NAME}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(credentials), f, indent=2)
    os.replace(partial, target)
    return target


def forget() -> bool:
    try:
        path().unlink()
    except FileNotFoundError:
        return False
    return True


class CredentialsError(Exception):
    """The saved login can't be read; logging in again writes a good one."""
