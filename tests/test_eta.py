"""The pipeline's time estimate: a kept calibration, a cost per step, the plan printed before training."""

import multiprocessing
from types import SimpleNamespace

import pytest
from tiny_data import make_tiny_dataset

from cxrlib import eta, study
from cxrlib.presets import resolve
from cxrlib.splits import make_folds


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_calibration_measures_once_per_machine_and_setting(private_cache, monkeypatch):
    preset = resolve("smoke")
    calls = []

    def fake_measure(setting, pool):
        calls.append(setting)
        return 10.0 * 64 / setting[0], 40.0 * 64 / setting[0]

    monkeypatch.setattr(eta, "_measure_side_by_side", fake_measure)
    rates = eta.calibrate(preset, progress=False)
    assert set(rates) == {32, 64} and rates[64] == {"train_img_s": 10.0, "infer_img_s": 40.0}
    assert [s[0] for s in calls] == [32, 64] and calls[0][1] == 16  # resolution, per-process batch
    assert eta.calibrate(preset, progress=False) == rates and len(calls) == 2  # kept, not measured again
    assert (private_cache / "calibration.json").is_file()


def test_calibration_on_a_gpu_measures_in_a_spawned_child_not_in_the_pipeline(private_cache, monkeypatch):
    # A measurement in the pipeline's own process would keep its GPU memory cached through training.
    monkeypatch.setattr(eta, "_measure", lambda setting: pytest.fail("measured in the caller's process"))
    monkeypatch.setattr(eta, "machine_label", lambda: "a GPU machine")
    settings = [(r, 16, 4, 1, True, "cuda") for r in (256, 2048)]  # 4 GPU processes
    monkeypatch.setattr(eta, "training_settings", lambda preset: settings)
    pools = []

    class Pool:
        def __init__(self, processes):
            self.processes, self.tasks = processes, []
            pools.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *error):
            return False

        def map(self, function, items, chunksize=None):
            self.tasks += [(function, item) for item in items]
            return [(2.0, 8.0)] * len(items)

    methods = []
    context = SimpleNamespace(Pool=Pool)
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: methods.append(method) or context)
    rates = eta.calibrate(resolve("smoke"), progress=False)
    assert methods == ["spawn"] and len(pools) == 1 and pools[0].processes == 1
    assert pools[0].tasks == [(eta._measure, s) for s in settings]  # one child's GPU, times 4 GPUs
    assert rates == {r: {"train_img_s": 8.0, "infer_img_s": 32.0} for r in (256, 2048)}


def test_a_real_measurement_gives_positive_rates(private_cache):
    setting = (32, 2, 1, 1, True, "cpu")
    train, infer = eta._measure(setting)
    assert 0 < train < infer  # a training step costs more than an inference step


def test_estimate_names_every_step_from_training_on_and_training_follows_the_rates(tmp_path, private_cache):
    data = make_tiny_dataset(tmp_path / "tiny")
    preset = resolve("smoke")
    folds = make_folds(data.frame, k=3, seed=0)
    slow = {r: {"train_img_s": 1.0, "infer_img_s": 10.0} for r in (32, 64)}
    fast = {r: {"train_img_s": 10.0, "infer_img_s": 100.0} for r in (32, 64)}
    expected = eta.estimate(preset, slow, folds)
    assert list(expected) == [
        s.name(r) for s in study.STEPS[3:] for r in ([32, 64] if s.per_resolution else [None])
    ]
    quicker = eta.estimate(preset, fast, folds)
    train = (folds["role_0"] == "train").sum()
    # two epochs of the training images at 1 img/s, against 10 img/s: 2 x train x (1 - 1/10) seconds saved
    saved = expected["03_train_res32"] - quicker["03_train_res32"]
    assert saved > 2 * train * 0.9


def test_the_plan_printed_before_training_names_the_machine_each_step_and_the_whole_run(
    tmp_path, monkeypatch, capsys
):
    data = make_tiny_dataset(tmp_path / "tiny")
    preset = resolve("smoke")
    folds = make_folds(data.frame, k=3, seed=0)
    monkeypatch.setattr(eta, "machine_label", lambda: "a CPU")
    monkeypatch.setattr(
        eta, "calibrate", lambda preset: {r: {"train_img_s": 1.0, "infer_img_s": 10.0} for r in (32, 64)}
    )
    monkeypatch.setattr(study, "load_data", lambda preset: (data.frame, folds))
    names = ["00_data", "03_train_res32", "03_train_res64"]
    expected = eta.forecast(preset, {"00_data": 5.0}, names)
    assert list(expected) == names and expected["03_train_res32"] > 2 * (folds["role_0"] == "train").sum()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "expected time on this machine (a CPU):" and lines[1].split() == [
        "00_data",
        "5s",
        "(done)",
    ]
    left = eta.clock(expected["03_train_res32"] + expected["03_train_res64"])
    assert lines[-1].split()[:4] == [
        "whole",
        "run",
        eta.clock(5.0 + sum(expected.values()) - expected["00_data"]),
        f"({left}",
    ]
    monkeypatch.setattr(study, "load_data", lambda preset: 1 / 0)
    assert eta.forecast(preset, {}, names) is None  # a failed estimate is said in one line, not raised
    assert capsys.readouterr().out == "(no time estimate: ZeroDivisionError: division by zero)\n"


def test_the_field_sweep_estimate_counts_the_arms_still_to_train(tmp_path, private_cache):
    data = make_tiny_dataset(tmp_path / "tiny")
    preset = resolve("smoke", run_dir=str(tmp_path / "run"))
    preset.field_sweep.arms = {
        "baseline": {},
        "global-context": {"global_context": True},
        "twice-the-steps": {"epochs": 6, "continue_from": "baseline"},  # 4 epochs more than the baseline's 2
    }
    folds = make_folds(data.frame, k=3, seed=0)
    rates = {r: {"train_img_s": 1.0, "infer_img_s": 10.0} for r in (32, 64)}
    every = eta.estimate(preset, rates, folds)["10_field_sweep"]
    roles = [eta._roles(folds, fold) for fold in preset.trained_folds()]
    one = eta.training_seconds(preset, rates[64], roles[0], 64)
    assert every == pytest.approx(eta.KERNEL_SECONDS + (1 + 1 + 2) * one + eta.FIELD_SWEEP_ANALYSIS_S)
    done = tmp_path / "run" / "res64-global-context" / "fold0" / "done.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")  # a finished arm is not trained again
    rest = eta.estimate(preset, rates, folds)["10_field_sweep"]
    assert rest == pytest.approx(every - one)


def test_clock_reads_like_a_clock():
    assert (eta.clock(40), eta.clock(725), eta.clock(3720)) == ("40s", "12m05s", "1h02m")
