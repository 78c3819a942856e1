"""Learning-rate schedules: values against hand-computed ones, and saving inside a model."""
import keras
import numpy as np
import pytest

from faceid_keras import compat
from faceid_keras.schedules import WarmupPolynomialDecay, WarmupStepDecay


def _values(schedule, steps):
    return [float(compat.to_numpy(schedule(step))) for step in steps]


def test_polynomial_decay_matches_insightface_poly_scheduler():
    schedule = WarmupPolynomialDecay(0.1, total_steps=100, warmup_steps=10)
    # warmup 0.1 * s / 10; after: 0.1 * (1 - (s - 10) / 90) ** 2; 0 from step 100 on.
    expected = [0.0, 0.05, 0.09, 0.1, 0.1 * (1 - 45 / 90) ** 2, 0.1 * (1 - 80 / 90) ** 2, 0.0, 0.0]
    assert _values(schedule, [0, 5, 9, 10, 55, 90, 100, 150]) == pytest.approx(expected, abs=1e-7)


def test_polynomial_decay_without_warmup_and_other_power():
    schedule = WarmupPolynomialDecay(2.0, total_steps=8, power=1.0)
    assert _values(schedule, [0, 2, 4, 8]) == pytest.approx([2.0, 1.5, 1.0, 0.0])


def test_step_decay_warmup_then_factor_at_each_boundary():
    schedule = WarmupStepDecay(0.1, boundaries=[20, 30], warmup_steps=4, factor=0.1)
    expected = [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert _values(schedule, [0, 2, 4, 19, 20, 29, 30, 1000]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: WarmupPolynomialDecay(0.1, total_steps=5, warmup_steps=5),
        lambda: WarmupPolynomialDecay(0.1, total_steps=10, warmup_steps=-1),
        lambda: WarmupStepDecay(0.1, boundaries=[30, 20]),
        lambda: WarmupStepDecay(0.1, boundaries=[1.5]),
    ],
)
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "schedule",
    [
        WarmupPolynomialDecay(0.05, total_steps=40, warmup_steps=3, power=2.0),
        WarmupStepDecay(0.05, boundaries=[2, 6], warmup_steps=1, factor=0.5),
    ],
    ids=["poly", "step"],
)
def test_schedule_is_saved_with_the_optimizer(schedule, tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule), loss="mse")
    model.fit(np.ones((8, 3), "float32"), np.zeros((8, 2), "float32"), batch_size=4, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    saved = loaded.optimizer.get_config()["learning_rate"]
    assert saved["registered_name"] == f"faceid>{type(schedule).__name__}"
    restored = keras.optimizers.schedules.deserialize(saved)
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    assert int(loaded.optimizer.iterations) == 2
    assert _values(restored, range(10)) == pytest.approx(_values(schedule, range(10)))
