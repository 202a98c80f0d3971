"""Runtime settings: torch threads, and repetitive library warnings shown once (a real int8 model on CPU)."""

from __future__ import annotations

import io
import logging
import os
import warnings

import pytest
import torch

from components.runtime import (ONCE_LOG_MESSAGES, OncePerMessage, ShowOnce, configure_threads, progress_bars,
                                quiet_library_warnings)

BNB_LOGGER = "bitsandbytes.autograd._functions"


@pytest.fixture
def restored_warning_state():
    """Start without quiet_library_warnings' hooks and put the process-wide state back afterwards
    (catch_warnings restores the filters and warnings.showwarning)."""
    loggers = {name: logging.getLogger(name) for name in ONCE_LOG_MESSAGES}
    saved_filters = {name: list(logger.filters) for name, logger in loggers.items()}
    for logger in loggers.values():
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, OncePerMessage)]
    with warnings.catch_warnings():
        yield
    for name, logger in loggers.items():
        logger.filters[:] = saved_filters[name]


def test_configure_threads_uses_the_given_number_or_every_core():
    before = torch.get_num_threads()
    try:
        configure_threads(1)
        assert torch.get_num_threads() == 1
        configure_threads(None)
        assert torch.get_num_threads() == os.cpu_count()
    finally:
        torch.set_num_threads(before)


def test_a_busy_machine_is_reported_once_with_what_to_do(monkeypatch, caplog):
    from components import runtime

    assert runtime.contention_message(2.9, 2, 2) is None  # our own previous stage keeps ~2 cores busy
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (6.3, 5.0, 4.0))
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "_contention_warned", False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="lmforge.runtime"):
            configure_threads(None)
            configure_threads(None)
    finally:
        torch.set_num_threads(before)
    busy = [r.getMessage() for r in caplog.records if "machine is busy" in r.getMessage()]
    assert busy == ["the machine is busy (load 6.3 on 2 cores): steps may run many times slower than on idle "
                    "cores. Let other jobs finish, or set compute.threads below 2 for every job that shares "
                    "these cores."]


def _int8_matmul_warnings(tiny_model_dir, caplog) -> int:
    from transformers import BitsAndBytesConfig

    from components.models.loading import load_model, load_tokenizer, select_hardware

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), select_hardware("cpu", "fp32"),
                       quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=BNB_LOGGER):
        model.generate(**tokenizer(["ICD-10-CM code"], return_tensors="pt"), max_new_tokens=4, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    return sum(r.name == BNB_LOGGER and r.getMessage().startswith("MatMul8bitLt") for r in caplog.records)


def test_int8_cast_warning_is_logged_once(tiny_model_dir, caplog, restored_warning_state):
    # Four generation steps through 14 int8 linear layers: one warning per matmul without the filter.
    assert _int8_matmul_warnings(tiny_model_dir, caplog) > 1
    quiet_library_warnings()
    assert _int8_matmul_warnings(tiny_model_dir, caplog) == 1
    assert _int8_matmul_warnings(tiny_model_dir, caplog) == 0


def test_peft_deprecation_is_shown_once_even_after_filter_changes(tiny_model_dir, restored_warning_state):
    """Python's filters forget what they showed whenever the filters change ("once" included); ShowOnce does not."""
    from peft import LoraConfig, get_peft_model

    from components.models.loading import load_model, select_hardware

    shown: list[str] = []
    warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))

    def wrap_twice_with_a_filter_change_between() -> int:
        shown.clear()
        for _ in range(2):
            get_peft_model(load_model(str(tiny_model_dir), select_hardware("cpu", "fp32")), LoraConfig(r=2))
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # as Prefect does
        return sum("is_gradient_checkpointing" in m for m in shown)

    warnings.simplefilter("default")
    assert wrap_twice_with_a_filter_change_between() == 2
    quiet_library_warnings()
    assert wrap_twice_with_a_filter_change_between() == 1
    warnings.warn("an unrelated warning", UserWarning)
    assert shown[-1] == "an unrelated warning"


def test_quiet_library_warnings_is_idempotent(restored_warning_state):
    quiet_library_warnings()
    show = warnings.showwarning
    log_filters = {name: list(logging.getLogger(name).filters) for name in ONCE_LOG_MESSAGES}
    quiet_library_warnings()
    assert warnings.showwarning is show and isinstance(show, ShowOnce) and not isinstance(show.show, ShowOnce)
    assert {name: logging.getLogger(name).filters for name in ONCE_LOG_MESSAGES} == log_filters
    assert all(sum(isinstance(f, OncePerMessage) for f in fs) == 1 for fs in log_filters.values())


def test_once_per_message_lets_other_messages_through():
    once = OncePerMessage(("MatMul8bitLt",))

    def passes(message: str) -> bool:
        return once.filter(logging.LogRecord(BNB_LOGGER, logging.WARNING, __file__, 1, message, None, None))

    assert [passes("MatMul8bitLt: a"), passes("MatMul8bitLt: a"), passes("MatMul8bitLt: b")] == [True, False, True]
    assert passes("something else") and passes("something else")


def test_no_progress_turns_off_the_libraries_bars_too(monkeypatch):
    import datasets
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("LMFORGE_NO_PROGRESS", "1")
    assert not progress_bars()
    try:
        quiet_library_warnings()
        assert not hf_logging.is_progress_bar_enabled()  # transformers 5's "Loading weights" bar
        assert not datasets.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
    monkeypatch.setenv("LMFORGE_NO_PROGRESS", "0")
    assert progress_bars()
    monkeypatch.delenv("LMFORGE_NO_PROGRESS")
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file, not a terminal
    assert not progress_bars()
