"""Search spaces: the schema, the define-by-run function and the trial configs it yields."""

import functools
from pathlib import Path

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aesearch.config import variant_family
from aesearch.errors import ConfigError
from aesearch.search.space import (
    DefineByRun,
    load_space,
    parse_space,
    sample_params,
    start_points,
    trial_config,
)
from tests.conftest import REPO

SPACES = sorted((REPO / "aesearch" / "spaces").glob("*.yaml"))  # the shipped spaces
MINIMAL = {"name": "s", "space": {"model.latent_dim": {"type": "int", "low": 2, "high": 8}}}


def test_the_shipped_spaces_are_the_documented_ones():
    assert {p.stem for p in SPACES} == {
        "quickstart", "mnist_variants", "mnist_vae_beta", "fashion_mnist_denoising", "cifar10_conv",
        "wine_anomaly", "digits_images", "compression", "digits_reconstruction", "digits_anomaly",
        "digits_clustering", "mnist_generation",
    }


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_space_validates_and_says_how_to_launch_it(path: Path):
    space = load_space(path)
    assert space.name == path.stem
    assert f"aesearch search {path.stem}" in path.read_text().split("\nname:")[0]


def test_every_use_has_a_shipped_space_that_stands_on_it():
    from aesearch.search.uses import USES

    assert {load_space(path).use for path in SPACES} >= set(USES)


@functools.cache
def shipped(path: Path):
    """A shipped space, loaded (and its trials checked, ~0.3 s) once, not once per example."""
    return load_space(path)


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_define_by_run_yields_only_valid_complete_trials_without_orphans(path, seed):
    space = shipped(path)
    for params in sample_params(space, 3, seed=seed):
        config = trial_config(space, params)
        dumped = config.model_dump(mode="json")
        for name, parameter in space.space.items():
            conditions_hold = all(
                parent in params and params[parent] in (wanted if isinstance(wanted, list) else [wanted])
                for parent, wanted in parameter.when.items()
            )
            # present exactly when its parents take the wanted values: complete, and no orphans
            assert (name in params) == conditions_hold, f"{name}: present={name in params}, conditions={conditions_hold}"
        for name, value in params.items():
            path_value = dumped
            for part in (space.space[name].path or name).split("."):
                path_value = path_value[part]
            assert path_value == value, name
        assert config.epochs == space.budget.max_epochs and config.data == space.data


def test_define_by_run_computes_nothing_but_suggestions():
    space = load_space("quickstart")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    assert DefineByRun(space)(trial) is None
    assert set(trial.params) <= set(space.space)


def test_quickstart_starts_with_one_trial_per_variant_family():
    space = load_space("quickstart")
    families = {variant_family(trial_config(space, point)) for point in space.start_with}
    assert families == {"dense", "stacked", "conv", "attention", "denoising", "sparse_l1", "sparse_kl", "contractive", "vae", "beta_vae"}
    encoded = start_points(space)[0]
    assert encoded["model.hidden_dims"] == "[128]"  # lists travel to Optuna as JSON text


def test_list_choices_round_trip_through_optuna():
    space = parse_space({**MINIMAL, "space": {"model.hidden_dims": {"type": "categorical", "choices": [[64], [32, 16]]}}})
    values = {tuple(p["model.hidden_dims"]) for p in sample_params(space, 20)}
    assert values == {(64,), (32, 16)}


def test_two_parameters_may_set_one_field_under_exclusive_conditions():
    space = load_space("quickstart")
    levels = {}
    for params in sample_params(space, 200):
        kind = params["corruption.kind"]
        config = trial_config(space, params)
        if kind != "none":
            levels.setdefault(kind, []).append(config.corruption.level)
    assert max(levels["salt_pepper"] + levels["masking"]) <= 0.4 < max(levels["gaussian"])


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"space": {"model.widths": {"type": "int", "low": 1, "high": 3}}}, r"space\.model\.widths: 'model\.widths' is not a config field"),
        ({"space": {"data.val_fraction": {"type": "float", "low": 0.1, "high": 0.2}}}, r"'data\.val_fraction' is fixed for a search"),
        ({"space": {"epochs": {"type": "int", "low": 1, "high": 3}}}, r"'epochs' is fixed for a search"),
        ({"space": {"model.latent_dim": {"type": "int", "low": 8, "high": 2}}}, r"`low < high` must hold, but got low=8\.0, high=2\.0"),
        ({"space": {"optimizer.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, r"log-scaled parameter needs low > 0"),
        ({"space": {"model.latent": {"type": "categorical"}}}, r"a categorical parameter takes `choices`"),
        ({"space": {"model.latent": {"type": "bool", "choices": [1]}}}, r"space\.model\.latent\.type='bool': unknown parameter type; valid names: categorical, float, int"),
        ({"space": {"objective.kl.beta": {"type": "float", "low": 1, "high": 2, "when": {"model.latent": "gaussian"}}}}, r"'model\.latent' must be a parameter listed before"),
        (
            {"space": {"model.latent": {"type": "categorical", "choices": ["gaussian"]}, "objective.kl.beta": {"type": "float", "low": 1, "high": 2, "when": {"model.latent": "normal"}}}},
            r"model\.latent='normal' is not a value 'model\.latent' can take",
        ),
        ({"space": {"model.latent_dim": {"type": "int", "low": 2, "high": 8, "oops": 1}}}, r"space\.model\.latent_dim\.oops: unknown key"),
        ({"objective": {"metric": "val/recon_mse", "mode": "up"}}, r"objective\[0\]\.mode='up': unknown direction; valid names: max, min"),
        ({"objective": {"metric": "val/recon_mse", "mode": "max"}}, r"objective\.mode='max': for val/recon_mse lower is better, so the mode is 'min'"),
        ({"budget": {"num_samples": 0}}, r"budget\.num_samples=0: Input should be greater than or equal to 1"),
        ({"objective": {"metric": "test/recon_mse"}}, r"objective\.metric='test/recon_mse': not a metric known after every epoch; one of val/recon_mse"),
        ({"space": {"model.activation": {"type": "categorical", "choices": ["relu", __import__("datetime").date(2020, 1, 1)]}}}, r"each choice must be plain data"),
        ({"space": {"noise/sigma": {"path": "corruption.level", "type": "float", "low": 0.1, "high": 0.2}}}, r"space\.noise/sigma\.\[key\]='noise/sigma': String should match pattern"),
        (
            {"space": {"optimizer.lr": {"type": "float", "low": 0.001, "high": 0.01}, "model.latent_dim": {"type": "int", "low": 2, "high": 8, "when": {"optimizer.lr": 0.005}}}},
            r"space\.model\.latent_dim\.when: 'optimizer\.lr' must be a categorical parameter",
        ),
        ({"base": {"runtime": {"device": "cuda"}}}, r"base\.runtime\.device asks for CUDA, but resources\.gpu=0"),
        (
            {"space": {"model.architecture": {"type": "categorical", "choices": ["dense", "conv"]}, "model.conv_channels": {"type": "categorical", "choices": [[8]], "when": {"model.architecture": "conv"}}},
             "start_with": [{"model.architecture": "dense", "model.conv_channels": [8]}]},
            r"start_with\[0\] sets model\.conv_channels, which its `when` conditions switch off",
        ),
        ({"resources": {"gpu": 1.5}}, r"resources\.gpu=1\.5: Input should be less than or equal to 1"),
        ({"objective": {"mode": "best"}}, r"objective\[0\]\.mode='best'"),
        ({"base": {"epochs": 3}}, r"base\.epochs: set it at the top level"),
        ({"start_with": [{"model.latent_dim": 100}]}, r"start_with\[0\]: model\.latent_dim=100 is not a value"),
        ({"space": {"model.patch_size": {"type": "categorical", "choices": [3]}}, "base": {"model": {"architecture": "attention"}}}, r"the trial \{model\.patch_size=3\} is not a valid config: model\.patch_size=3 must divide"),
        ({"base": {"model": {"latent_dim": 0}}, "space": {"seed": {"type": "int", "low": 0, "high": 2}}}, r"model\.latent_dim=0"),
        ({"name": "a b"}, r"name='a b': String should match pattern"),
        ({"sampler": "grid"}, r"sampler='grid': unknown sampler; valid names: random, tpe$"),
        ({"early_stopping": "hyperband"}, r"early_stopping='hyperband': unknown early stopping; valid names: asha, asha_first_objective, none$"),
        ({"resources": {"pack": 0}}, r"resources\.pack=0: Input should be greater than or equal to 1"),
    ],
)
def test_malformed_space_names_the_field(change, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        parse_space({**MINIMAL, **change})
    assert "\n" not in str(caught.value)


def test_grace_period_is_capped_by_the_epoch_budget():
    space = parse_space({**MINIMAL, "budget": {"max_epochs": 3, "grace_period": 5}})
    assert space.budget.grace_period == 3


def test_brackets_are_capped_by_the_rungs_there_are():
    # epochs 1-3-9-27 of 30 at reduction factor 3: 4 rungs, so at most 4 brackets; 1 by default
    assert parse_space({**MINIMAL, "budget": {"max_epochs": 30}}).budget.brackets == 1
    assert parse_space({**MINIMAL, "budget": {"max_epochs": 30, "brackets": 3}}).budget.brackets == 3
    assert parse_space({**MINIMAL, "budget": {"max_epochs": 30, "brackets": 6}}).budget.brackets == 4
    assert parse_space({**MINIMAL, "budget": {"max_epochs": 2, "grace_period": 1}}).budget.brackets == 1
    assert parse_space({**MINIMAL, "budget": {"max_epochs": 8, "grace_period": 2, "reduction_factor": 2,
                                              "brackets": 1}}).budget.brackets == 1


def test_start_point_may_leave_parameters_to_the_searcher():
    space = load_space("quickstart")
    partial = parse_space({**space.model_dump(mode="json"), "start_with": [{"corruption.kind": "gaussian"}]})
    from aesearch.search.space import start_trials

    (trial,) = start_trials(partial)
    assert trial["corruption.kind"] == "gaussian" and 0.05 <= trial["sigma"] <= 0.5


def test_space_overrides_from_the_command_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nspace:\n  model.latent_dim: {type: int, low: 2, high: 8}\n")
    space = load_space(path, {"budget.num_samples": 3, "resources.cpu": 0.5})
    assert space.budget.num_samples == 3 and space.resources.cpu == 0.5
    with pytest.raises(ConfigError, match=r"budget\.max_epochs=0"):
        load_space(path, {"budget.max_epochs": 0})


def test_every_sampler_and_early_stopping_the_schema_accepts_builds_its_part():
    from aesearch.search.driver import sampler_for, scheduler_for
    from aesearch.search.mo_asha import FIFO, MultiObjectiveASHA, SeededASHA
    from aesearch.search.strategies import SAMPLERS, SCHEDULERS

    space = parse_space({**MINIMAL, "budget": {"max_epochs": 7, "grace_period": 2}})
    several = parse_space({**MINIMAL, "objective": [{"metric": "val/recon_mse"}, {"metric": "model/latent_dim"}]})
    for name in SAMPLERS:  # each name the schema takes builds an Optuna sampler
        assert sampler_for(space.model_copy(update={"sampler": name})) is not None
    built = {name: scheduler_for(s.model_copy(update={"early_stopping": name}))
             for name in SCHEDULERS for s in [several if name == "asha_first_objective" else space]}
    assert (built["asha"]._max_t, built["asha"]._time_attr) == (7, "epoch")
    assert type(built["none"]) is FIFO  # Ray's FIFO, nothing stopped
    assert type(built["asha_first_objective"]) is SeededASHA and built["asha_first_objective"]._metric == "val/recon_mse"
    assert type(scheduler_for(several)) is MultiObjectiveASHA
    tpe = sampler_for(space)
    assert type(sampler_for(space.model_copy(update={"sampler": "random"}))).__name__ == "RandomSampler"
    assert type(tpe).__name__ == "WindowedTPESampler"
    assert tpe._group and tpe._multivariate  # one objective: joint within each group of conditional parameters
    assert not sampler_for(several)._group  # several: Optuna's default MOTPE, as benchmarked


def test_the_objectives_mode_is_the_direction_the_metric_catalogue_gives():
    document = {"name": "s", "space": {"model.latent_dim": {"type": "categorical", "choices": [8]}},
                "objective": {"metric": "val/loss", "mode": "max"}}
    with pytest.raises(ConfigError, match=r"objective.mode='max': for val/loss lower is better, so the mode is 'min'"):
        parse_space(document)
    document["objective"]["mode"] = "min"
    assert parse_space(document).primary.mode == "min"
