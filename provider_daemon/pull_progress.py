"""Folds an engine's image-pull stream into layer and byte counts, for progress reports.

`POST /images/create` answers with one JSON item per line, and the two engines we talk to
say different things (both seen through docker-py's `api.pull(..., stream=True,
decode=True)`):

- Docker: `{"status": "Pulling from <repo>", "id": "<tag>"}` first; then per layer (`id`:
  12 hex digits of its digest) "Pulling fs layer", "Waiting", "Downloading" with
  `progressDetail: {current, total}`, "Verifying Checksum", "Download complete",
  "Extracting" (with its own progressDetail), and "Pull complete" -- or only "Already
  exists"; then id-less "Digest: ..." and "Status: ..." lines.
- Podman 4.3 (recorded on these machines): per blob, the image config included,
  "Pulling fs layer", "Downloading" with `progressDetail: {current, total}` once a second
  (so a blob fetched in under a second never tells its size), and "Download complete" --
  or only "Already exists" for a blob it has. No "Pulling from", no extraction step (a
  layer is stored as it arrives), and a last "Download complete" repeating the config's
  id (the image id).

Both report a failure as an item with `error` (and `errorDetail: {message}`) inside a
stream that was answered with 200, which docker-py does not raise for.
"""

from dataclasses import dataclass
from typing import Any

from common.messages import PullState, PullStatus


class PullFailed(Exception):
    """The engine reported an error inside the pull stream; holds its own words."""


@dataclass
class _Layer:
    current: int = 0
    # Its (compressed) size, once an item told it.
    total: int | None = None
    done: bool = False

    def downloaded(self) -> None:
        if self.total is not None:
            self.current = self.total


# Per-layer statuses after which the layer is there; "Download complete" joins them for
# engines that don't extract afterwards (Podman).
_FINISHED = {"Pull complete", "Already exists"}
_DOWNLOADED = {"Download complete", "Verifying Checksum"}


class PullTracker:
    """Fed each stream item in order (from one thread); `state()` is the aggregate."""

    def __init__(self) -> None:
        self._layers: dict[str, _Layer] = {}
        # Docker extracts each layer after downloading it and only then says "Pull
        # complete"; it is recognised by its "Pulling from" header or an "Extracting".
        self._extracts = False

    def feed(self, item: dict[str, Any]) -> None:
        """Takes one stream item; raises PullFailed for the engine's error item."""
        detail = item.get("errorDetail")
        error = item.get("error") or (detail.get("message") if isinstance(detail, dict) else None)
        if error:
            raise PullFailed(str(error).strip())
        status = str(item.get("status") or "")
        layer_id = item.get("id")
        if status.startswith("Pulling from"):
            self._extracts = True  # and its id is the tag, not a layer
            return
        if not isinstance(layer_id, str) or not layer_id:
            return  # "Digest: ...", "Status: ...": about the image, not a layer
        layer = self._layers.get(layer_id)
        if layer is None:
            layer = self._layers[layer_id] = _Layer()
        elif status == "Download complete" and layer.done and not self._extracts:
            # Podman's last line names the image by its config blob, which is no layer.
            del self._layers[layer_id]
            return
        if status == "Downloading":
            progress = item.get("progressDetail") or {}
            total = _int(progress.get("total"))
            if total is not None and total > 0:
                layer.total = total
            current = _int(progress.get("current"))
            if current is not None:
                layer.current = current
        elif status == "Extracting":
            self._extracts = True
            layer.downloaded()  # its progressDetail counts extraction, not download
        elif status in _DOWNLOADED:
            layer.downloaded()
            if not self._extracts and status == "Download complete":
                layer.done = True
        elif status in _FINISHED:
            layer.downloaded()
            layer.done = True

    def state(self, status: PullStatus = "pulling") -> PullState:
        """The counts so far; "done" counts everything as there."""
        layers = self._layers.values()
        sized = [layer for layer in layers if layer.total is not None]
        bytes_total = sum(layer.total or 0 for layer in sized)
        if status == "done":
            return PullState(
                status=status,
                layers_done=len(layers),
                layers_total=len(layers),
                bytes_done=bytes_total,
                bytes_total=bytes_total,
            )
        return PullState(
            status=status,
            layers_done=sum(layer.done for layer in layers),
            layers_total=len(layers),
            bytes_done=sum(min(layer.current, layer.total or 0) for layer in sized),
            bytes_total=bytes_total,
        )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
