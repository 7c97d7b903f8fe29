"""ImageNet ResNet50 weights by name: `model.pretrained='imagenet'`.

`resolve_weights(spec, cache_dir)` turns `config.model.pretrained` into the
path of a checked weight file:

  ''                         no weights (train from scratch)
  'imagenet'                 timm/resnet50.tv_in1k: torchvision's IMAGENET1K_V1
  'timm/resnet50.<tag>'      another timm ResNet50, e.g. timm/resnet50.tv2_in1k
                             (torchvision's V2) or timm/resnet50.a1_in1k
  anything else              a local file, read by `pretrained.load_resnet50`

timm publishes these weights as `model.safetensors` in torchvision's key layout
(conv1, bn1, layer1.0.conv1, ..., fc), so the loader needs neither torch nor
timm. A hub name is looked up in one plain place, so a file can also be put
there by hand:

  <cache_dir>/pretrained/resnet50.<tag>.safetensors

A file found there is used without asking the network, after a check: when a
`<file>.sha256` line sits beside it (every download writes one, with the
hub's SHA-256), the file must hash to it (an empty or garbled `.sha256` is
refused too: the check it stands for cannot be made); every file must hold exactly the
ResNet50 keys and shapes (`pretrained.load_resnet50`) with finite values.
A file that fails is refused, never loaded.

Otherwise the file is downloaded through `huggingface_hub` into a temporary
folder beside its place (the hub client checks its size; we then check its
SHA-256 against the one the hub publishes, and the keys and shapes) and only
then renamed into place. Without network the error says which weights were
wanted, where to put them, the command that fetches them on a connected
machine, and how to train from scratch instead.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import safetensors

from saltjax.errors import ConfigError
from saltjax.model import pretrained

DEFAULT_REPO = "timm/resnet50.tv_in1k"
HUB_FILENAME = "model.safetensors"
# The huggingface_hub version requirements.txt pins; named in the fetch command.
HUB_CLIENT = "huggingface_hub==2.4.0"

_HUB_NAME = re.compile(r"timm/(resnet50\.[A-Za-z0-9_]+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCRATCH_HINT = "--config.model.pretrained=''"


def hub_repo(spec: str) -> str | None:
  """The hub repository `spec` names, or None when it is a local path."""
  if spec == "imagenet":
    return DEFAULT_REPO
  return spec if _HUB_NAME.fullmatch(spec) else None


def cached_path(repo_id: str, cache_dir: str) -> pathlib.Path:
  """Where the weights of `repo_id` live: <cache_dir>/pretrained/resnet50.<tag>.safetensors."""
  name = _HUB_NAME.fullmatch(repo_id).group(1)
  return pathlib.Path(cache_dir).expanduser() / "pretrained" / f"{name}.safetensors"


def fetch_instructions(repo_id: str, target: pathlib.Path) -> str:
  """How to fetch the weights on a connected machine and where they go."""
  folder = target.stem  # e.g. resnet50.tv_in1k
  return (
      f"on a machine with internet run `pip install {HUB_CLIENT} && hf download"
      f" {repo_id} {HUB_FILENAME} --local-dir {folder}` and copy"
      f" {folder}/{HUB_FILENAME} to {target}"
  )


def resolve_weights(spec: str, cache_dir: str) -> str:
  """The path of the checked weight file `spec` names ('' for no weights).

  Args:
    spec: `config.model.pretrained`: '', 'imagenet', 'timm/resnet50.<tag>' or
      a local path.
    cache_dir: `config.cache_dir`; hub weights live under its `pretrained/`.

  Returns:
    '' for '', the expanded path for a local file, and for a hub name the
    cached file, downloaded first when it is not there.

  Raises:
    ConfigError: the local file does not exist; the cached file
      is corrupt or not a ResNet50; the download failed (no network, no such
      repository) or gave a file that fails the checks. The message names
      the weights, the cache path, the command that fetches them and how to
      train from scratch.
  """
  if not spec:
    return ""
  repo_id = hub_repo(spec)
  if repo_id is None:
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
      raise ConfigError(
          f"config.model.pretrained={spec!r}: no such file, and not 'imagenet' or a"
          f" timm/resnet50.<tag> hub name; use {_SCRATCH_HINT} to train from scratch"
      )
    return str(path)

  target = cached_path(repo_id, cache_dir)
  if target.is_file():
    problem = check_weights(target)
    if problem:
      raise ConfigError(
          f"config.model.pretrained={spec!r}: the cached weights {target} are refused:"
          f" {problem}. Delete {target} (and {_sidecar(target).name} beside it) and run"
          f" again to download {repo_id} anew, or put a good copy there by hand"
          f" ({fetch_instructions(repo_id, target)}); or train from scratch with"
          f" {_SCRATCH_HINT}"
      )
    return str(target)
  _download(spec, repo_id, target)
  return str(target)


def check_weights(path: pathlib.Path, sha256: str | None = None) -> str:
  """What is wrong with the weight file at `path`, or '' when it is usable.

  The file must hash to `sha256` (or to its `.sha256` line, when one is
  beside it: an empty or garbled one is a problem too), and hold exactly
  ResNet50's keys and shapes with finite values.
  """
  expected = sha256 or _read_sidecar(path)
  if not sha256 and expected is not None and not _SHA256.fullmatch(expected):
    # An empty or garbled sidecar (a full disk or a kill while it was
    # written): the hash the file came with is lost, so it cannot be checked.
    return (
        f"its {_sidecar(path).name} beside it holds no SHA-256"
        f" ({'empty' if not expected else repr(expected[:80])}), so the file cannot be"
        " checked against the hash it was downloaded with"
    )
  if expected:
    got = file_sha256(path)
    if got != expected:
      return f"its SHA-256 is {got}, expected {expected}"
  try:
    variables = pretrained.load_resnet50(str(path))
  except (ValueError, OSError, safetensors.SafetensorError) as e:
    # SafetensorError (not a ValueError): a truncated or garbled file.
    return f"it is not a readable torchvision/timm ResNet50 state dict ({e})"
  for leaf in _leaves(variables):
    if not np.all(np.isfinite(leaf)):
      return "it holds non-finite values"
  return ""


def file_sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def install(downloaded: pathlib.Path, target: pathlib.Path, sha256: str | None) -> str:
  """Checks a downloaded file, then renames it to `target` ('' or the problem).

  The `.sha256` line goes in first, so a file at `target` is never without
  the hash it came with; a refused file is removed.
  """
  problem = check_weights(downloaded, sha256)
  if problem:
    downloaded.unlink(missing_ok=True)
    return problem
  sidecar = _sidecar(target)
  if sha256:
    tmp = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{sha256}  {target.name}\n")
    os.replace(tmp, sidecar)
  else:
    sidecar.unlink(missing_ok=True)
  os.replace(downloaded, target)
  return ""


def _download(spec: str, repo_id: str, target: pathlib.Path) -> None:
  import httpx2  # huggingface_hub's HTTP client: its transport errors
  import huggingface_hub
  from huggingface_hub import errors as hub_errors

  def offline(reason: str) -> ConfigError:
    return ConfigError(
        f"config.model.pretrained={spec!r} wants the ImageNet weights {repo_id}"
        f" ({HUB_FILENAME}), which are not in the cache and could not be downloaded"
        f" ({reason}). Put the file at {target}: {fetch_instructions(repo_id, target)},"
        f" then run again; or train from scratch with {_SCRATCH_HINT}"
    )

  try:
    entries = huggingface_hub.HfApi().get_paths_info(repo_id, [HUB_FILENAME])
  except hub_errors.RepositoryNotFoundError:
    raise ConfigError(
        f"config.model.pretrained={spec!r}: the hub has no repository {repo_id}; use"
        f" 'imagenet' ({DEFAULT_REPO}), another timm/resnet50.<tag>, a local file,"
        f" or {_SCRATCH_HINT}"
    ) from None
  except (OSError, httpx2.HTTPError) as e:
    raise offline(_one_line(e)) from None
  files = [e for e in entries if isinstance(e, huggingface_hub.hf_api.RepoFile)]
  if not files:
    raise ConfigError(f"config.model.pretrained={spec!r}: {repo_id} has no {HUB_FILENAME}")
  sha256 = files[0].lfs.sha256 if files[0].lfs else None

  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".download-{target.stem}-", dir=target.parent))
  except OSError as e:
    raise ConfigError(
        f"config.model.pretrained={spec!r}: cannot write the weights under"
        f" {target.parent} ({e}); choose another --config.cache_dir"
    ) from None
  try:
    try:
      downloaded = huggingface_hub.hf_hub_download(
          repo_id, HUB_FILENAME, local_dir=staging, cache_dir=staging
      )
    except (OSError, httpx2.HTTPError) as e:
      raise offline(_one_line(e)) from None
    problem = install(pathlib.Path(downloaded), target, sha256)
    if problem:
      raise ConfigError(
          f"config.model.pretrained={spec!r}: the file downloaded from {repo_id} is"
          f" refused: {problem}. Nothing was written to {target}; run again, or train"
          f" from scratch with {_SCRATCH_HINT}"
      )
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _sidecar(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + ".sha256")


def _read_sidecar(path: pathlib.Path) -> str | None:
  sidecar = _sidecar(path)
  if not sidecar.is_file():
    return None
  words = sidecar.read_text().split()
  return words[0].lower() if words else ""


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree


def _one_line(error: Exception) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= 200 else text[:197] + "..."
