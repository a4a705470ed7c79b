"""FineLineCallback against the Trainer's callback order (transformers 4.x/5.x: on_step_end,
then on_log for that step when control.should_log is set; with logging_strategy="epoch" the
log comes from on_epoch_end, after the step was handed over). The end-to-end check against
a real Trainer is tests/integration/test_hf_trainer_integration.py."""

from types import SimpleNamespace

from fineline_monitor.integrations.hf_trainer import FineLineCallback


class FakeMonitor:
    should_stop = False

    def __init__(self):
        self.steps = []

    def step(self, **kw):
        self.steps.append(kw)

    def close(self):
        pass


def _cb():
    cb = FineLineCallback()
    cb.monitor = FakeMonitor()
    return cb


def _end(cb, step, should_log, skipped=False, tokens=None):
    state = SimpleNamespace(global_step=step, num_input_tokens_seen=tokens)
    control = SimpleNamespace(should_log=should_log, should_training_stop=False)
    cb.on_step_end(None, state, control, optimizer=SimpleNamespace(step_was_skipped=skipped))
    return state, control


def test_logged_step_gets_its_own_loss():
    cb = _cb()
    for step, loss in ((1, 3.0), (2, 2.5)):
        state, control = _end(cb, step, True, tokens=100 * step)
        assert len(cb.monitor.steps) == step - 1  # waits for on_log
        cb.on_log(
            None, state, control, logs={"loss": loss, "grad_norm": 1.5, "learning_rate": 1e-3}
        )
    assert [(s["step"], s["loss"], s["tokens"], s["lr"]) for s in cb.monitor.steps] == [
        (1, 3.0, 100, 1e-3),
        (2, 2.5, 200, 1e-3),
    ]


def test_epoch_logs_go_with_the_next_step_and_eval_logs_are_ignored():
    cb = _cb()
    _end(cb, 1, False)
    state, control = _end(cb, 2, False)
    cb.on_log(None, state, control, logs={"eval_loss": 9.0})
    cb.on_log(None, state, control, logs={"loss": 2.0, "grad_norm": 0.5})  # from on_epoch_end
    _end(cb, 3, False)
    assert [(s["step"], s["loss"], s["grad_norm"]) for s in cb.monitor.steps] == [
        (1, None, None),
        (2, None, None),
        (3, 2.0, 0.5),
    ]


def test_a_log_that_never_comes_is_flushed_and_skips_are_passed():
    cb = _cb()
    _end(cb, 1, True, skipped=True, tokens=64)  # announced, but the Trainer did not log
    _end(cb, 2, False, tokens=128)
    assert [(s["step"], s["tokens"], s["skipped"]) for s in cb.monitor.steps] == [
        (1, 64, True),
        (2, 128, False),
    ]
    _end(cb, 3, True)
    cb.on_train_end(
        None, SimpleNamespace(global_step=3), SimpleNamespace(should_training_stop=False)
    )
    assert [s["step"] for s in cb.monitor.steps] == [1, 2, 3]


def test_a_late_non_finite_grad_norm_is_dropped():
    cb = _cb()
    state, control = _end(cb, 1, False, skipped=True)
    cb.on_log(
        None, state, control, logs={"loss": 2.0, "grad_norm": float("inf")}
    )  # epoch log after step 1
    _end(cb, 2, False)
    assert [(s["step"], s["loss"], s["grad_norm"]) for s in cb.monitor.steps] == [
        (1, None, None),
        (2, 2.0, None),
    ]
