import pytest

from aesearch.errors import ConfigError
from aesearch.parts.models import ARCHITECTURES, LATENTS
from aesearch.registry import Registry


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown architecture 'mlp'; valid names: attention, conv, dense"):
        ARCHITECTURES["mlp"]


def test_registry_returns_registered_part():
    registry: Registry[int] = Registry("thing")
    registry.add("one", 1)
    assert registry["one"] == 1
    assert "one" in registry and "two" not in registry
    assert registry.names() == ["one"]


def test_registry_refuses_duplicate_names():
    registry: Registry[int] = Registry("thing")
    registry.add("one", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("one", 2)


def test_latent_registry_has_both_kinds():
    assert LATENTS.names() == ["deterministic", "gaussian"]
