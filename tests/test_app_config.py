"""--conf parsing: typed values, defaults, and errors that name the key."""

from __future__ import annotations

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
])
def test_errors_name_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        AppConfig.from_conf({key: value})


def test_index_location(tmp_path):
    c = AppConfig.from_conf({})
    assert c.index_path(str(tmp_path), "/app") == tmp_path / ".ragseg"
    assert str(c.index_path("http://127.0.0.1:8042/dicom-web", "/app")) == "/app/.ragseg"
    assert str(AppConfig.from_conf({"index_dir": "/x/y"}).index_path(str(tmp_path), "/app")) == "/x/y"
