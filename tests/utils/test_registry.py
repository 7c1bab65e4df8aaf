from __future__ import annotations

import pytest

from microseg.errors import ConfigError
from microseg.utils.registry import Registry


def test_register_get_and_refuse_a_second_owner():
    reg: Registry[type] = Registry("widget")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and "a" in reg and reg.names() == ["a"]
    reg.register("a")(A)  # the same owner again is fine (module re-import)

    class B:
        pass

    with pytest.raises(ConfigError, match="already registered"):
        reg.register("a")(B)
    with pytest.raises(ConfigError, match=r"unknown widget 'c'; registered: \['a'\]"):
        reg.get("c")
    reg.remove("a")
    assert "a" not in reg


def test_lazy_names_import_their_module_on_first_lookup():
    reg: Registry[object] = Registry("thing", lazy={"json": "json"})
    assert "json" in reg and reg.names() == ["json"]
    with pytest.raises(ConfigError, match="unknown thing 'json'"):
        reg.get("json")  # the module imported but registered nothing under the name
    reg.add("json", 1)
    assert reg.get("json") == 1


def test_models_registry_lists_every_family():
    from microseg.models import MODELS, get_model

    assert {"unet", "punet", "maskrcnn", "yolo", "classical"} <= set(MODELS.names())
    assert get_model("classical").trainable is False
    with pytest.raises(ConfigError, match="registered"):
        get_model("resnet")
