import pytest

from aesearch.config import TrainConfig, load_config, parse_config, variant_family
from aesearch.errors import ConfigError
from aesearch.schema import apply_overrides


def test_defaults_are_a_valid_plain_autoencoder():
    config = TrainConfig()
    assert config.data.name == "digits"
    assert config.model.latent == "deterministic"
    assert config.model.code_activation == "none"  # 'auto' resolved
    assert variant_family(config) == "stacked"


def test_auto_code_activation_is_sigmoid_under_kl_sparsity():
    config = parse_config({"objective": {"sparsity": {"kind": "kl", "rho": 0.1}}})
    assert config.model.code_activation == "sigmoid"


def test_resolved_config_round_trips():
    config = parse_config({"model": {"latent": "gaussian"}, "objective": {"kl": {"beta": 4.0}}})
    again = parse_config(config.model_dump(mode="json"))
    assert again == config


@pytest.mark.parametrize(
    "document, expected",
    [
        ({"model": {"latent_dim": 0}}, r"model\.latent_dim=0: Input should be greater than or equal to 1"),
        ({"model": {"latent_dim": "16"}}, r"model\.latent_dim='16': Input should be a valid integer"),
        ({"model": {"architecture": "mlp"}}, r"model\.architecture='mlp': unknown architecture; valid names: attention, conv, dense"),
        ({"model": {"widths": [1]}}, r"model\.widths: unknown key"),
        ({"corruption": {"kind": "gaussian", "level": -0.1}}, r"corruption\.level=-0\.1: for gaussian the level is sigma, and sigma must be > 0"),
        ({"corruption": {"kind": "salt_pepper", "level": 1.5}}, r"corruption\.level=1\.5: .*p must be in \(0, 1\)"),
        ({"corruption": {"kind": "masking"}}, r"corruption\.level is required for corruption 'masking'"),
        ({"corruption": {"kind": "blur", "level": 1}}, r"corruption\.kind='blur': unknown corruption; valid names: gaussian, masking, none"),
        ({"objective": {"sparsity": {"kind": "kl", "rho": 1.2}}}, r"objective\.sparsity\.rho=1\.2: Input should be less than 1"),
        ({"objective": {"sparsity": {"kind": "kl", "rho": 0}}}, r"objective\.sparsity\.rho=0: Input should be greater than 0"),
        ({"model": {"latent": "gaussian"}, "objective": {"kl": {"beta": -1}}}, r"objective\.kl\.beta=-1: Input should be greater than or equal to 0"),
        ({"objective": {"kl": {"beta": 2}}}, r"objective\.kl applies only to model\.latent='gaussian'"),
        ({"model": {"latent": "gaussian"}, "objective": {"sparsity": {"kind": "l1"}}}, r"sparsity\.kind='l1' needs model\.latent='deterministic'"),
        ({"model": {"code_activation": "relu"}, "objective": {"sparsity": {"kind": "kl"}}}, r"model\.code_activation='relu': .*must be 'sigmoid'"),
        ({"model": {"architecture": "attention", "patch_size": 3}}, r"model\.patch_size=3 must divide the 8x8 images of digits"),
        ({"model": {"architecture": "attention", "embed_dim": 30, "heads": 4}}, r"model\.embed_dim=30 must be divisible by model\.heads=4"),
        ({"data": {"anomaly": [10]}}, r"data\.anomaly: 10 is not a class of digits \(0\.\.9\)"),
        ({"data": {"name": "imagenet"}}, r"data\.name='imagenet': unknown dataset; valid names: cifar10, digits"),
        ({"data": {"val_fraction": 0}}, r"data\.val_fraction=0: Input should be greater than 0"),
        ({"optimizer": {"lr": 0}}, r"optimizer\.lr=0: Input should be greater than 0"),
        ({"optimizer": {"name": "sgd"}}, r"optimizer\.name='sgd': unknown optimizer; valid names: adam, adamw"),
        ({"objective": {"kl": {"schedule": "cosine"}}, "model": {"latent": "gaussian"}}, r"unknown beta schedule; valid names: constant, cyclical, linear"),
        ({"epochs": True}, r"epochs=True: Input should be a valid integer"),
        ({"runtime": {"device": "tpu"}}, r"runtime\.device='tpu': String should match pattern"),
        ({"evaluation": {"denoise_levels": {"gaussian": -1}}}, r"evaluation\.denoise_levels\.gaussian=-1"),
    ],
)
def test_bad_value_names_field_value_and_rule(document, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        parse_config(document)
    assert "\n" not in str(caught.value)


def test_several_problems_are_reported_on_one_line():
    with pytest.raises(ConfigError) as caught:
        parse_config({"model": {"latent_dim": 0, "depth": 0}})
    message = str(caught.value)
    assert "model.latent_dim=0" in message and "model.depth=0" in message and "\n" not in message


def test_non_mapping_document_is_refused():
    with pytest.raises(ConfigError, match="expected a mapping of config fields, got list"):
        parse_config([1, 2])


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  latent_dim: 4\n  hidden_dims: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: malformed YAML at line \d+"):
        load_config(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(path)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_set_nested_fields_with_yaml_types():
    document = apply_overrides({"model": {"latent_dim": 4}}, ["model.latent_dim=32", "model.hidden_dims=[64, 32]", "objective.kl.beta=2.5"])
    assert document["model"] == {"latent_dim": 32, "hidden_dims": [64, 32]}
    assert document["objective"]["kl"]["beta"] == 2.5


def test_overrides_do_not_touch_the_original():
    original = {"model": {"latent_dim": 4}}
    apply_overrides(original, ["model.latent_dim=8"])
    assert original == {"model": {"latent_dim": 4}}


@pytest.mark.parametrize("override, expected", [("latent_dim", "expected key.path=value"), ("name.x=1", "'name' is a value, not a section")])
def test_bad_override_is_one_line(override, expected):
    with pytest.raises(ConfigError, match=expected):
        apply_overrides({"name": "x"}, [override])


def test_load_config_applies_overrides_then_validates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  latent_dim: 4\n")
    assert load_config(path, ["model.latent_dim=8"]).model.latent_dim == 8
    with pytest.raises(ConfigError, match="model.latent_dim=-1"):
        load_config(path, ["model.latent_dim=-1"])


@pytest.mark.parametrize(
    "document, family",
    [
        ({"model": {"latent": "gaussian"}}, "vae"),
        ({"model": {"latent": "gaussian"}, "objective": {"kl": {"beta": 0.5}}}, "beta_vae"),
        ({"corruption": {"kind": "masking", "level": 0.3}}, "denoising"),
        ({"objective": {"contractive_weight": 0.1}}, "contractive"),
        ({"model": {"architecture": "conv"}}, "conv"),
        ({"model": {"hidden_dims": [64]}}, "dense"),
    ],
)
def test_variant_family(document, family):
    assert variant_family(parse_config(document)) == family


@pytest.mark.parametrize("document", [{}, {"objective": {"sparsity": {"kind": "kl"}}}, {"corruption": {"kind": "uniform", "level": 0.2}}])
def test_every_resolved_config_round_trips(document):
    config = parse_config(document)
    assert parse_config(config.model_dump(mode="json")) == config


@pytest.mark.parametrize(
    "document, expected",
    [
        ({"model": {"latent": "gaussian"}, "objective": {"kl": {"beta": float("inf")}}}, r"objective\.kl\.beta=inf: Input should be a finite number"),
        ({"optimizer": {"lr": True}}, r"optimizer\.lr=True: .*not a boolean"),
        ({"corruption": {"kind": "uniform", "level": float("nan")}}, r"corruption\.level=nan"),
        ({"model": {"latent_dim": 10**11}}, r"model\.latent_dim=100000000000: Input should be less than or equal to 4096"),
        ({"name": "../escape"}, r"name='\.\./escape': String should match pattern"),
    ],
)
def test_non_finite_boolean_and_oversized_values_are_refused(document, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(document)


def test_validation_leaves_the_callers_sections_untouched():
    from aesearch.config import TrainConfig
    from aesearch.parts.models import ModelConfig
    from aesearch.parts.objectives import ObjectiveConfig

    model = ModelConfig()
    config = TrainConfig(model=model, objective=ObjectiveConfig(sparsity={"kind": "kl"}))
    assert config.model.code_activation == "sigmoid" and model.code_activation == "auto"


def test_yaml_aliases_are_not_expanded(tmp_path):
    """A 'billion laughs' document: aliases nest 9^9 strings if expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\nmodel: {hidden_dims: *a9}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["seed=1"])
    assert len(str(caught.value)) < 2000


def test_deeply_nested_yaml_is_a_clean_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: malformed YAML"):
        load_config(path)


def test_flatten_names_every_field_once():
    from aesearch.schema import flatten

    flat = flatten(TrainConfig().model_dump(mode="json"))
    assert flat["model.latent_dim"] == 16 and flat["objective.kl.beta"] == 1.0
    assert flat["evaluation.denoise_levels.gaussian"] == 0.3
    assert not any(isinstance(value, dict) for value in flat.values())
