"""Presets are data: every shipped preset loads, overrides apply, bad settings are named."""

import pytest
import yaml

from cxrlib.presets import available_presets, check_resolution, load_preset, resolve


def test_every_shipped_preset_loads_and_names_the_paper_ones():
    names = available_presets()
    assert {"smoke", "demo", "phantom-gpu", "kermany", "mimic"} <= set(names)
    for name in names:
        preset = load_preset(name)
        assert preset.name == name and preset.resolutions
    mimic = load_preset("mimic")
    assert mimic.resolutions == [256, 512, 1024, 2048]
    assert mimic.trained_folds() == [0, 1, 2, 3, 4]
    assert mimic.train.weights == "imagenet"


def test_unknown_preset_and_unknown_setting_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'.*smoke"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("resolutions: [64]\ntrain:\n  epocs: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: train: unknown setting\(s\) \['epocs'\]"):
        load_preset(bad)


@pytest.mark.parametrize("resolution", [16, 48, 100, 0])
def test_resolutions_must_be_multiples_of_32(resolution):
    with pytest.raises(ValueError, match=f"resolution {resolution} must be a multiple of 32"):
        check_resolution(resolution)
    with pytest.raises(ValueError, match="multiple of 32"):
        resolve("smoke", resolutions=[resolution])


def test_overrides_and_folders(tmp_path):
    preset = resolve("smoke", resolutions=[64], folds=[1], gpus=2, run_dir=str(tmp_path / "r"))
    assert preset.resolutions == [64] and preset.trained_folds() == [1] and preset.train.gpus == 2
    assert preset.index_path == tmp_path / "r" / "index.csv"
    assert preset.cache_path == tmp_path / "r" / "cache"
    with pytest.raises(ValueError, match="fold 7 does not exist"):
        resolve("smoke", folds=[7])
    with pytest.raises(ValueError, match="needs a data root"):
        _ = resolve("mimic").data_path


def test_per_resolution_train_options_override_shared_ones(tmp_path):
    custom = tmp_path / "custom.yaml"
    custom.write_text(
        "resolutions: [32, 64]\ntrain:\n  epochs: 4\n  options: {batch_size: 16}\n"
        "  per_resolution:\n    64: {batch_size: 8}\n"
    )
    preset = load_preset(custom)
    assert preset.name == "custom"
    assert preset.train_options(32)["batch_size"] == 16
    assert preset.train_options(64) == {"epochs": 4, "weights": "imagenet", "batch_size": 8}


def test_several_nodes_are_refused_with_the_torchrun_command_to_use(tmp_path):
    custom = tmp_path / "two-nodes.yaml"
    custom.write_text("resolutions: [256]\ntrain:\n  nnodes: 2\n")
    message = r"train.nnodes 2: .*one node.*torchrun --nnodes=2 --node-rank=<0..1>"
    with pytest.raises(ValueError, match=message) as error:
        load_preset(custom)
    assert "\n" not in str(error.value)


def test_cudnn_autotuning_is_on_by_default_and_the_phantom_gpu_preset_turns_it_off_in_the_trainer():
    from cxrlib.launch import build_command

    assert resolve("demo").train.cudnn_benchmark and "no_cudnn_benchmark" not in resolve(
        "demo"
    ).train_options(64)
    preset = resolve("phantom-gpu")
    assert not preset.train.cudnn_benchmark and preset.train_options(2048)["no_cudnn_benchmark"] is True
    assert "--no-cudnn-benchmark" in build_command(2048, 0, "o", "i", "f", "c", **preset.train_options(2048))


def test_the_field_sweep_preset_trains_exactly_as_the_demo_at_its_top_resolution():
    demo, sweep = resolve("demo"), resolve("receptive-field")
    assert sweep.field_sweep.resolution == max(demo.resolutions) == sweep.resolutions[0]
    assert sweep.data_path == demo.data_path and sweep.cache_path == demo.cache_path
    assert sweep.data.phantom_options == demo.data.phantom_options
    assert (sweep.data.subjects, sweep.data.seed, sweep.data.max_size) == (
        demo.data.subjects, demo.data.seed, demo.data.max_size,
    )  # fmt: skip
    assert sweep.folds == demo.folds and sweep.train == demo.train
    assert sweep.steps == ["00_data", "02_downscale", "10_field_sweep"]
    assert sweep.train_options(128) == demo.train_options(128)
    assert list(sweep.field_sweep.arms) == ["baseline", "global-context", "twice-the-steps", "coarse-only"]
    assert sweep.field_sweep.arms["coarse-only"]["findings"] == sweep.field_sweep.coarse


@pytest.mark.parametrize(
    "arms, message",
    [
        ({"global-context": {"global_context": True}}, "the first arm must be 'baseline'"),
        ({"baseline": {"epochs": 4}}, "the first arm must be 'baseline', with no settings"),
        ({"baseline": {}, "Two Steps": {"epochs": 4}}, "arm name 'Two Steps'"),
        ({"baseline": {}, "more": {"continue_from": "later"}, "later": {}}, "not an earlier arm"),
    ],
)
def test_the_arms_of_notebook_10_are_checked_when_the_preset_loads(tmp_path, arms, message):
    custom = tmp_path / "arms.yaml"
    custom.write_text(yaml.safe_dump({"resolutions": [64], "field_sweep": {"arms": arms}}, sort_keys=False))
    with pytest.raises(ValueError, match=message):
        load_preset(custom)
