"""--conf parsing: typed values, defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragseg.label_app.config import AppConfig, ConfigError


def test_defaults_and_types():
    c = AppConfig.from_conf({})
    assert c.k == 3 and c.image_size == 1024 and c.axis == "axial" and c.random_weights_for_testing is False
    c = AppConfig.from_conf({"k": "5", "image_size": "512", "labels": "liver=1,spleen=2", "propagate": "true",
                             "reconcile_interval": "0.5", "server_mode": "true"})
    assert (c.k, c.image_size, c.propagate, c.reconcile_interval) == (5, 512, True, 0.5)
    assert c.labels == {"liver": 1, "spleen": 2}
    assert AppConfig.from_conf({"labels": '{"a": 3}'}).labels == {"a": 3}
    assert (c.backend, c.retrieval, c.decoder, c.location_prior, c.max_regions) == ("auto", "auto", "auto", 2, 1)
    c = AppConfig.from_conf({"backend": "litemedsam", "retrieval": "litemedsam", "location_prior": "-1",
                             "max_regions": "8", "decoder": "/d", "region_score": "linear"})
    assert (c.backend, c.retrieval, c.location_prior, c.max_regions, c.decoder) == ("litemedsam", "litemedsam",
                                                                                    None, 8, "/d")
    assert c.region_score == "linear" and AppConfig.from_conf({}).region_score == "prototype"
    from types import SimpleNamespace

    from ragseg.label_app.components import Components

    # the models (and so the engine) are built with it
    assert Components.model_config(SimpleNamespace(cfg=c, index_dir=Path("/x"))).region_score == "linear"
    assert Components.model_config(SimpleNamespace(cfg=c, index_dir=Path("/x"))).feature_cache is None
    c = AppConfig.from_conf({"feature_cache": "~/feats"})
    assert Components.model_config(SimpleNamespace(cfg=c, index_dir=Path("/x"))).feature_cache == \
        str(Path("~/feats").expanduser())


def test_every_key_is_documented():
    """apps/ragseg/README.md has a row for every --conf key."""
    import re
    from dataclasses import fields

    readme = (Path(__file__).resolve().parents[1] / "apps" / "ragseg" / "README.md").read_text()
    keys = {f.name for f in fields(AppConfig)}
    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", readme, flags=re.M))
    assert keys - rows == set(), f"--conf keys without a README row: {sorted(keys - rows)}"


@pytest.mark.parametrize("key,value,needle", [
    ("k", "0", "--conf k: must be between 1 and 16"),
    ("k", "three", "--conf k: expected an integer"),
    ("image_size", "500", "--conf image_size: must be a multiple of 32"),
    ("axis", "oblique", "--conf axis: must be one of"),
    ("propagate", "maybe", "--conf propagate: expected true/false"),
    ("labels", "liver=1,spleen=1", "--conf labels: two names share"),
    ("labels", "liver=x", "--conf labels"),
    ("device", "tpu", "--conf device"),
    ("modle", "x", "--conf modle: unknown key"),
    ("backend", "sam3", "--conf backend: must be one of auto, rag-sam2, litemedsam"),
    ("retrieval", "clip", "--conf retrieval: must be one of"),
    ("max_regions", "0", "--conf max_regions: must be between 1 and 64"),
    ("region_score", "cosine", "--conf region_score: must be one of prototype, linear"),
    ("location_prior", "-2", "--conf location_prior: must be between -1 and 64"),
    ("pacs_attempts", "0", "--conf pacs_attempts: must be between 1 and 10"),
    ("pacs_retry_wait", "soon", "--conf pacs_retry_wait: expected a number"),
])
def test_errors_name_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        AppConfig.from_conf({key: value})


def test_index_location(tmp_path):
    c = AppConfig.from_conf({})
    assert c.index_path(str(tmp_path), "/app") == tmp_path / ".ragseg"
    assert str(c.index_path("http://127.0.0.1:8042/dicom-web", "/app")) == "/app/.ragseg"
    assert str(AppConfig.from_conf({"index_dir": "/x/y"}).index_path(str(tmp_path), "/app")) == "/x/y"


def test_backend_choice(tmp_path, monkeypatch):
    """auto: rag-sam2 only when the SAM 2.1 checkpoint is on disk; the reason names the fetch command."""
    from ragseg.factory import ModelConfig, choose_backend

    monkeypatch.setenv("RAGSEG_WEIGHTS_DIR", str(tmp_path / "w"))
    b, why = choose_backend(ModelConfig())
    assert b == "litemedsam" and "ragseg weights fetch sam2.1-hiera-tiny" in why
    assert choose_backend(ModelConfig(backend="rag-sam2"))[0] == "rag-sam2"
    assert choose_backend(ModelConfig(random_weights=True))[0] == "rag-sam2"
    ck = tmp_path / "w" / "sam2.1-hiera-tiny" / "sam2.1_hiera_tiny.pt"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"x")
    assert choose_backend(ModelConfig()) == ("rag-sam2", "SAM 2 checkpoint sam2.1-hiera-tiny found")


def test_pacs_retries_are_the_configured_attempts(tmp_path):
    """A PACS answering 503 (or refusing connections) is tried pacs_attempts times, not
    dicomweb-client's 5 tries over 30 s; the conf keys reach the app's DICOMweb client."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests
    import retrying
    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    from ragseg.label_app.dicomweb import seg_writing, set_retries

    hits: list[str] = []

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = DICOMwebClient(url=f"http://127.0.0.1:{httpd.server_port}/dicom-web")
        for attempts in (3, 1):
            hits.clear()
            set_retries(client, attempts, 0.01)
            with pytest.raises((requests.HTTPError, retrying.RetryError), match="503"):  # retries spent / none
                client.search_for_series(search_filters={"Modality": "SEG"})
            assert len(hits) == attempts, hits
    finally:
        httpd.shutdown()
        httpd.server_close()
    # a refused connection is retried the same way
    dead = DICOMwebClient(url=f"http://127.0.0.1:{httpd.server_port}/dicom-web")
    calls = []
    real_get = dead._session.get
    dead._session.get = lambda *a, **kw: (calls.append(1), real_get(*a, **kw))[1]
    set_retries(dead, 2, 0.01)
    with pytest.raises(requests.ConnectionError):
        dead.search_for_series()
    assert len(calls) == 2

    cfg = AppConfig.from_conf({"pacs_attempts": "4", "pacs_retry_wait": "0.2"})
    assert (cfg.pacs_attempts, cfg.pacs_retry_wait) == (4, 0.2)
    ds = DICOMWebDatastore.__new__(DICOMWebDatastore)  # the instance MONAI Label built; only its client matters
    ds._client = DICOMwebClient(url="http://127.0.0.1:1/dicom-web")
    seg_writing(ds, dict, attempts=cfg.pacs_attempts, retry_wait_s=cfg.pacs_retry_wait)
    assert ds._client._max_attempts == 4 and ds._client._wait_exponential_multiplier == 100  # waits 0.2, 0.4, 0.8 s
