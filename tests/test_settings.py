"""Every fit setting is written once: the settings dataclasses agree with the config schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from poplds import InputError
from poplds.nplds import NPLDSSettings
from poplds.stitched import StitchedSettings

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@pytest.mark.parametrize(
    ("cls", "block"), [(StitchedSettings, "stitched_lds"), (NPLDSSettings, "nplds")]
)
def test_settings_defaults_equal_the_schema_defaults(cls, block):
    props = yaml.safe_load(SCHEMA.read_text())["$defs"][block]["properties"]
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    in_config = set(props) - {"latent_dims"}
    assert in_config == set(fields) - set(cls.PYTHON_ONLY), "schema keys and fields differ"
    for name in in_config:
        value = fields[name]
        value = list(value) if isinstance(value, tuple) else value  # a frozen list
        assert value == props[name]["default"], f"{block}.{name}"
    # a config block with every default gives the default settings
    assert cls.from_config({k: v["default"] for k, v in props.items()}) == cls()


def test_unknown_setting_names_the_key():
    with pytest.raises(InputError, match=r"^nplds\.max_iters: not a setting"):
        NPLDSSettings.from_config({"max_iters": 3})
    s = NPLDSSettings.from_config({"dynamics_drift": True, "latent_dims": [1, 2]})
    assert s.models == ("plds", "nplds", "nplds_dynamics")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tol = 1.0  # type: ignore[misc]
