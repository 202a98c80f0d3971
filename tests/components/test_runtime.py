"""Runtime settings: torch threads, repetitive library warnings shown once (a real int8 model on CPU), and
notices a user cannot act on sent to the log file instead of the terminal."""

from __future__ import annotations

import io
import logging
import os
import warnings

import pytest
import torch

from components.runtime import (LOGGED_MESSAGES, ONCE_LOG_MESSAGES, OncePerMessage, WarningsToLog, configure_threads,
                                progress_bars, quiet_library_warnings)

BNB_LOGGER = "bitsandbytes.autograd._functions"


@pytest.fixture
def restored_warning_state():
    """Start without quiet_library_warnings' hooks and put the process-wide state back afterwards
    (catch_warnings restores the filters and warnings.showwarning)."""
    loggers = {name: logging.getLogger(name) for name in [*ONCE_LOG_MESSAGES, *LOGGED_MESSAGES]}
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
        with caplog.at_level("WARNING", logger="components.runtime"):
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


def test_peft_deprecation_goes_once_to_the_log_not_the_terminal(tiny_model_dir, restored_warning_state, caplog):
    """Python's filters forget what they showed whenever the filters change ("once" included); the
    deprecation peft triggers in transformers is logged once all the same, and never shown."""
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
    with caplog.at_level(logging.INFO, logger="components.runtime"):
        assert wrap_twice_with_a_filter_change_between() == 0
    logged = [r for r in caplog.records if r.name == "components.runtime" and "is_gradient_checkpointing" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO
    warnings.warn("an unrelated warning", UserWarning)
    assert shown[-1] == "an unrelated warning"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(("name", "notice"), [
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
                                      "'kernels'. Please make sure you already `pip install kernels`"),
    ("huggingface_hub.repocard", "Repo card metadata block was not found. Setting CardData to empty."),
    ("mlflow.store.db.utils", "Creating initial MLflow database tables..."),
    ("transformers.tokenization_utils_tokenizers", "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer "
                                                   "TokenizersBackend. The clean_up_tokenization post-processing ..."),
])
def test_notices_a_user_cannot_act_on_go_once_to_the_log_file(name, notice, restored_warning_state, caplog):
    library = logging.getLogger(name)  # DeepSpeed's does not propagate: its own handler prints it
    collect = _Collect()
    library.addHandler(collect)
    try:
        quiet_library_warnings()
        with caplog.at_level(logging.INFO, logger="components.runtime"):
            library.warning(notice)
            library.warning(notice)
            library.warning("something else went wrong")
    finally:
        library.removeHandler(collect)
    assert collect.messages == ["something else went wrong"]  # the library's own output: only what matters
    ours = [r.getMessage() for r in caplog.records if r.name == "components.runtime"]
    assert ours == [f"{name}: {notice}"]


def test_quiet_library_warnings_is_idempotent(restored_warning_state):
    names = [*ONCE_LOG_MESSAGES, *LOGGED_MESSAGES]
    quiet_library_warnings()
    show = warnings.showwarning
    log_filters = {name: list(logging.getLogger(name).filters) for name in names}
    quiet_library_warnings()
    assert warnings.showwarning is show and isinstance(show, WarningsToLog) and not isinstance(show.show, WarningsToLog)
    assert {name: logging.getLogger(name).filters for name in names} == log_filters
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


def test_the_registered_models_decode_prints_no_bpe_clean_up_warning(tiny_model_dir, restored_warning_state, caplog):
    # What MLflow's chat wrapper does with a loaded registered model (mlflow/transformers/llm_inference_utils.py):
    # the real call, on the logger transformers really uses (the parametrized test above checks the routing).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    library = logging.getLogger("transformers.tokenization_utils_tokenizers")
    collect = _Collect()
    library.addHandler(collect)
    try:
        quiet_library_warnings()
        with caplog.at_level(logging.INFO, logger="components.runtime"):
            tokenizer.decode([5, 6, 7], skip_special_tokens=True, clean_up_tokenization_spaces=True)
    finally:
        library.removeHandler(collect)
    assert collect.messages == []
    assert any("clean_up_tokenization_spaces" in r.getMessage() for r in caplog.records if r.name == "components.runtime")
