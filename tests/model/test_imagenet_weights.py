"""Tests for saltjax.model.imagenet_weights: `model.pretrained='imagenet'` offline.

There is no route to the hub here, so every test is offline: the hub client
is pointed at a closed local port (it fails at once), files are placed in the
cache by hand as a user would, and the state dicts are generated in
torchvision's layout by tests/model/test_pretrained.py's hand-written reference.
"""

import hashlib
import pathlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import fold
from saltjax.app import config_checks
from saltjax.model import imagenet_weights
from saltjax.model import pretrained
from tests.conftest import flag_args, run_main, run_python
from tests.model.test_pretrained import _random_state_dict

# A closed port: a connection attempt is refused at once, never timed out.
NO_NETWORK = {
    "HF_ENDPOINT": "http://127.0.0.1:1",
    "HF_HUB_OFFLINE": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@pytest.fixture(scope="module")
def state_dict():
  return _random_state_dict(seed=3)


@pytest.fixture
def no_hub(monkeypatch):
  """A cache hit must not touch the network: any hub call fails the test."""
  import huggingface_hub

  def forbidden(*args, **kwargs):
    raise AssertionError("the hub was asked although the file is in the cache")

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
  monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", forbidden)


def _sha256(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "spec, repo",
    [
        ("imagenet", "timm/resnet50.tv_in1k"),
        ("timm/resnet50.tv_in1k", "timm/resnet50.tv_in1k"),
        ("timm/resnet50.tv2_in1k", "timm/resnet50.tv2_in1k"),
        ("timm/resnet50.a1_in1k", "timm/resnet50.a1_in1k"),
        ("timm/resnet50d.ra2_in1k", None),  # another architecture
        ("timm/resnet50", None),  # no weights tag
        ("resnet50.tv_in1k", None),  # not a hub name: a path
        ("weights/resnet50.safetensors", None),
        ("timm/resnet50.tv_in1k/../x", None),
    ],
)
def test_hub_names(spec, repo):
  assert imagenet_weights.hub_repo(spec) == repo


def test_cache_layout_is_one_plain_file(tmp_path):
  assert (
      imagenet_weights.cached_path("timm/resnet50.tv_in1k", str(tmp_path))
      == tmp_path / "pretrained" / "resnet50.tv_in1k.safetensors"
  )
  assert (
      imagenet_weights.cached_path("timm/resnet50.a1_in1k", str(tmp_path))
      == tmp_path / "pretrained" / "resnet50.a1_in1k.safetensors"
  )


def test_fold_config_defaults_to_imagenet_and_quick_to_none():
  from configs import quick

  assert fold.get_config().model.pretrained == "imagenet"
  assert quick.get_config().model.pretrained == ""
  config_checks.check(fold.get_config())  # a hub name needs no file up front


def test_pretrained_weights_need_the_resnet50_encoder():
  from configs import quick

  config = quick.get_config()
  config.model.pretrained = "imagenet"
  with pytest.raises(config_checks.ConfigError, match=r"stage_sizes=\(3,4,6,3\)"):
    config_checks.check(config)


def test_cache_hit_is_used_without_network(tmp_path, state_dict, no_hub):
  # A file placed in the cache by hand, as the error message tells a user to.
  target = tmp_path / "pretrained" / "resnet50.tv_in1k.safetensors"
  target.parent.mkdir()
  save_file(state_dict, str(target))
  path = imagenet_weights.resolve_weights("imagenet", str(tmp_path))
  assert path == str(target)
  loaded = pretrained.load_resnet50(path)
  np.testing.assert_array_equal(
      loaded["params"]["layer4_2"]["conv3"]["kernel"],
      state_dict["layer4.2.conv3.weight"].transpose(2, 3, 1, 0),
  )
  # A sidecar with the right SHA-256 (as a download writes it) is accepted too.
  (target.parent / (target.name + ".sha256")).write_text(f"{_sha256(target)}  {target.name}\n")
  assert imagenet_weights.resolve_weights("timm/resnet50.tv_in1k", str(tmp_path)) == path


def test_local_path_is_used_as_it_is(tmp_path, state_dict, no_hub):
  path = tmp_path / "my weights.safetensors"
  save_file(state_dict, str(path))
  assert imagenet_weights.resolve_weights(str(path), str(tmp_path / "cache")) == str(path)
  assert imagenet_weights.resolve_weights("", str(tmp_path)) == ""
  with pytest.raises(config_checks.ConfigError, match="no such file"):
    imagenet_weights.resolve_weights(str(tmp_path / "absent.safetensors"), str(tmp_path))


def _truncated(state_dict, path):
  save_file(state_dict, str(path))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _resnet18_like(state_dict, path):
  # A wrong network: ResNet50 without its last stage's third block.
  save_file({k: v for k, v in state_dict.items() if not k.startswith("layer4.2.")}, str(path))


def _with_nan(state_dict, path):
  broken = dict(state_dict)
  broken["layer1.0.conv2.weight"] = np.full_like(broken["layer1.0.conv2.weight"], np.nan)
  save_file(broken, str(path))


def _flipped_byte_with_sidecar(state_dict, path):
  # A downloaded file (its sidecar holds the hub's SHA-256) that got damaged
  # after the download: keys and shapes are intact, the hash is not.
  save_file(state_dict, str(path))
  (path.parent / (path.name + ".sha256")).write_text(f"{_sha256(path)}  {path.name}\n")
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF
  path.write_bytes(bytes(data))


def _empty_sidecar(state_dict, path):
  # A good file whose `.sha256` was left empty (a full disk or a kill while
  # it was written): the check it stands for cannot be made.
  save_file(state_dict, str(path))
  (path.parent / (path.name + ".sha256")).write_text("")


def _garbled_sidecar(state_dict, path):
  save_file(state_dict, str(path))
  (path.parent / (path.name + ".sha256")).write_text("not-a-hash  " + path.name + "\n")


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncated, "not a readable"),
        (_resnet18_like, "missing keys: layer4.2.bn1.bias"),
        (_with_nan, "non-finite"),
        (_flipped_byte_with_sidecar, "SHA-256"),
        (_empty_sidecar, "resnet50.tv_in1k.safetensors.sha256 beside it holds no SHA-256 (empty)"),
        (_garbled_sidecar, "holds no SHA-256 ('not-a-hash')"),
    ],
)
def test_corrupt_or_wrong_cached_file_is_refused(
    damage, reason, tmp_path, state_dict, no_hub, monkeypatch
):
  target = tmp_path / "pretrained" / "resnet50.tv_in1k.safetensors"
  target.parent.mkdir()
  damage(state_dict, target)
  loads = []
  monkeypatch.setattr(pretrained, "merge_encoder", lambda *a: loads.append(a))
  with pytest.raises(config_checks.ConfigError) as raised:
    imagenet_weights.resolve_weights("imagenet", str(tmp_path))
  message = str(raised.value)
  assert str(target) in message and "refused" in message and reason in message
  assert "--config.model.pretrained=''" in message
  assert not loads


def test_downloaded_file_is_installed_only_when_it_checks_out(tmp_path, state_dict):
  # The step after the hub client's download: hash against the hub's
  # SHA-256, keys and shapes, then the rename into place with its sidecar.
  target = tmp_path / "resnet50.tv_in1k.safetensors"
  downloaded = tmp_path / "staging" / "model.safetensors"
  downloaded.parent.mkdir()
  save_file(state_dict, str(downloaded))
  wrong_hash = "0" * 64
  problem = imagenet_weights.install(downloaded, target, wrong_hash)
  assert "SHA-256" in problem
  assert not target.exists() and not downloaded.exists()

  save_file(state_dict, str(downloaded))
  good_hash = _sha256(downloaded)
  assert imagenet_weights.install(downloaded, target, good_hash) == ""
  assert target.is_file() and not downloaded.exists()
  assert _sha256(target) == good_hash
  assert (tmp_path / "resnet50.tv_in1k.safetensors.sha256").read_text().split()[0] == good_hash


class _LocalHub:
  """A local HTTP server answering the three requests a download makes.

  It stands in for the hub (which this machine cannot reach) so that the
  real huggingface_hub client runs the download: paths-info (the file's
  SHA-256), then HEAD and GET of `resolve/main/model.safetensors`.
  """

  def __init__(self, blob: bytes, served: bytes):
    import http.server
    import json
    import threading

    sha256 = hashlib.sha256(blob).hexdigest()
    self.requests = []
    requests = self.requests

    class Handler(http.server.BaseHTTPRequestHandler):

      def _file_headers(self):
        self.send_header("X-Repo-Commit", "c" * 40)
        self.send_header("X-Linked-Etag", f'"{sha256}"')
        self.send_header("X-Linked-Size", str(len(blob)))
        self.send_header("Content-Length", str(len(served)))

      def do_HEAD(self):  # pylint: disable=invalid-name
        requests.append(("HEAD", self.path))
        self.send_response(200)
        self._file_headers()
        self.end_headers()

      def do_GET(self):  # pylint: disable=invalid-name
        requests.append(("GET", self.path))
        if not self.path.endswith("/resolve/main/model.safetensors"):
          self.send_error(404)
          return
        self.send_response(200)
        self._file_headers()
        self.end_headers()
        self.wfile.write(served)

      def do_POST(self):  # pylint: disable=invalid-name
        requests.append(("POST", self.path))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps(
            [
                {
                    "type": "file",
                    "path": "model.safetensors",
                    "size": len(blob),
                    "oid": "b" * 40,
                    "lfs": {"oid": sha256, "size": len(blob), "pointerSize": 134},
                }
            ]
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


# resolve_weights in a fresh process: huggingface_hub reads HF_ENDPOINT when
# it is imported.
_RESOLVE = """
import sys
from saltjax.app import config_checks
from saltjax.model import imagenet_weights
try:
  print(imagenet_weights.resolve_weights(sys.argv[1], sys.argv[2]))
except config_checks.ConfigError as e:
  sys.exit(f"error: {e}")
"""


def _resolve_in_process_with_endpoint(spec, cache, endpoint):
  return run_python(
      ["-c", _RESOLVE, spec, str(cache)],
      timeout=300,
      env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
  )


@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "damaged_in_transit"])
def test_download_through_the_hub_client(damaged, tmp_path, state_dict):
  source = tmp_path / "model.safetensors"
  save_file(state_dict, str(source))
  blob = source.read_bytes()
  # Same size, one byte changed: the hub client's size check passes, the
  # SHA-256 check must not.
  served = blob[:-3] + bytes([blob[-3] ^ 0xFF]) + blob[-2:] if damaged else blob
  hub = _LocalHub(blob, served)
  cache = tmp_path / "cache"
  target = cache / "pretrained" / "resnet50.tv2_in1k.safetensors"
  try:
    result = _resolve_in_process_with_endpoint("timm/resnet50.tv2_in1k", cache, hub.url)
    assert ("GET", "/timm/resnet50.tv2_in1k/resolve/main/model.safetensors") in hub.requests
    if damaged:
      assert result.returncode == 1
      assert "SHA-256" in result.stderr and "refused" in result.stderr
      assert not any(p.is_file() for p in cache.rglob("*"))  # nothing kept
    else:
      assert result.returncode == 0, result.stderr
      assert result.stdout.strip().splitlines()[-1] == str(target)
      assert target.read_bytes() == blob
      assert target.with_name(target.name + ".sha256").read_text() == (
          f"{hashlib.sha256(blob).hexdigest()}  {target.name}\n"
      )
      # Nothing else is left beside them (no temporary download folder).
      assert sorted(p.name for p in target.parent.iterdir()) == [
          target.name,
          target.name + ".sha256",
      ]
  finally:
    hub.close()


@pytest.mark.parametrize("env", [NO_NETWORK, {"HF_HUB_OFFLINE": "1"}], ids=["refused", "offline"])
def test_no_network_error_through_main_py(env, tmp_path):
  # configs/fold.py's own default ('imagenet'), with the ResNet50 encoder.
  cache, workdir = tmp_path / "cache", tmp_path / "run"
  args = [
      "--config=configs/fold.py",
      f"--workdir={workdir}",
      *flag_args(
          **{
              "model.stage_sizes": (3, 4, 6, 3),
              "model.encoder_width": 64,
              "model.decoder_channels": (256, 128, 64, 32, 16),
              "model.scse_reduction": 16,
              "cache_dir": str(cache),
              "compilation_cache": str(tmp_path / "jax_cache"),
          }
      ),
  ]
  result = run_main(args, timeout=300, env=env)
  assert result.returncode == 1, result.stderr
  err = result.stderr
  assert "Traceback" not in err
  target = cache / "pretrained" / "resnet50.tv_in1k.safetensors"
  error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, err
  paragraph = error_lines[0]
  for part in (
      "timm/resnet50.tv_in1k",
      str(target),
      "hf download timm/resnet50.tv_in1k model.safetensors",
      "--config.model.pretrained=''",
  ):
    assert part in paragraph, part
  assert not workdir.exists()
  assert not any(p.is_file() for p in (cache / "pretrained").rglob("*"))


def test_training_starts_from_the_cached_imagenet_weights(
    tmp_path, state_dict, no_hub, monkeypatch
):
  # state.initial_variables, as every fold calls it, with fold.py's default.
  import jax
  import jax.numpy as jnp
  from saltjax.training import state

  def zeros_of_the_model(key, model, image_size):
    # The random init of a ResNet50 U-Net takes minutes to compile on a
    # small CPU; its shapes are all that loading and merging depend on.
    shapes = jax.eval_shape(model.init, key, jnp.zeros((1, image_size, image_size, 1)))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))

  monkeypatch.setattr(state, "initialized", zeros_of_the_model)
  target = tmp_path / "pretrained" / "resnet50.tv_in1k.safetensors"
  target.parent.mkdir()
  save_file(state_dict, str(target))
  config = fold.get_config()
  config.cache_dir = str(tmp_path)
  config.image_size = 32
  config.model.decoder_channels = (8, 8, 8, 8, 8)
  variables = state.initial_variables(config, state.create_model(config))
  encoder = variables["params"]["encoder"]
  np.testing.assert_array_equal(
      encoder["layer3_5"]["conv2"]["kernel"],
      state_dict["layer3.5.conv2.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      variables["batch_stats"]["encoder"]["layer2_0"]["bn3"]["var"],
      state_dict["layer2.0.bn3.running_var"],
  )
  assert encoder["conv1"]["kernel"].shape == (7, 7, 1, 64)  # the gray stem
  assert not np.any(variables["params"]["decoder_0"]["conv1"]["kernel"])  # untouched
