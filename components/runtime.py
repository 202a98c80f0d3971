"""Process settings a stage run starts with: torch's CPU threads, and library warnings kept quiet.

Some library warnings repeat on every call and cannot be avoided from lmforge. Evaluating the int8
bitsandbytes model on CPU logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" on
every int8 matmul (LLM.int8() quantizes activations from fp16; our CPU activations are fp32, and
fp16 elsewhere would be emulated and slow): ~2,900 lines in the demo. peft 0.21 reads transformers'
deprecated `is_gradient_checkpointing` in every get_peft_model; Python's filters would show that
once, but any change to the filters (Prefect makes some) clears their memory, "once" included (it
is kept per calling module), so it comes back every stage.

Repeats are shown once per process. Notices that say nothing a user can act on (that peft
deprecation; DeepSpeed saying it found no GPU; bitsandbytes missing an optional kernel that is
fetched from the Hub; a model card without metadata; MLflow creating its database on a first run)
go once to the run's log file (logger components.runtime, INFO) and not to the terminal, where a
new user would take them for a problem.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

# (category, start of the message) of Python warnings a user cannot act on (one library reading
# another's deprecated API): each distinct message goes once to the log file, none to the terminal.
LOGGED_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
)
# Logger name -> starts of messages that logger emits repeatedly; each distinct message is shown once.
ONCE_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast",),
}
# Logger name -> starts of notices a user cannot act on: each distinct one goes once to the log file.
LOGGED_MESSAGES: dict[str, tuple[str, ...]] = {
    "DeepSpeed": ("Setting accelerator to CPU",),  # no GPU here; each stage's device is in its own log
    # An optional CPU kernel that the `kernels` package fetches from the Hugging Face Hub at run time;
    # bitsandbytes' own CPU path runs instead.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    # peft reading back the model card it wrote itself, which has no metadata block.
    "huggingface_hub.repocard": ("Repo card metadata block was not found",),
    # A first run's new tracking database (components.tracking.client_for); MLflow's own handler prints it.
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),
    # MLflow's chat wrapper decodes with clean_up_tokenization_spaces=True, the WordPiece clean-up; transformers
    # ignores it for a BPE tokenizer (the answers are unchanged) and says so at every first load of the model.
    "transformers.tokenization_utils_tokenizers": ("Ignoring clean_up_tokenization_spaces=True for BPE",),
}


log = logging.getLogger(__name__)  # its INFO goes to the run's log file only, its warnings to the terminal too
_contention_warned = False


def configure_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads: `threads` if given, else one per core; warn (once per process)
    when other work already keeps the cores busy."""
    import torch

    global _contention_warned
    cores = os.cpu_count() or 1
    torch.set_num_threads(threads or cores)
    message = contention_message(os.getloadavg()[0], cores, threads or cores)
    if message and not _contention_warned:
        _contention_warned = True
        log.warning(message)


def contention_message(load: float, cores: int, threads: int) -> str | None:
    """What to say when the 1-minute load average shows other processes competing for the cores, or None.

    Threads that outnumber free cores do not share them gracefully: a training step on 2 cores went from
    8 s to 130 s while three other 2-thread processes ran, here."""
    if load <= 1.5 * cores:
        return None
    return (f"the machine is busy (load {load:.1f} on {cores} cores): steps may run many times slower than "
            f"on idle cores. Let other jobs finish, or set compute.threads below {threads} "
            "for every job that shares these cores.")


class OncePerMessage(logging.Filter):
    """Lets each distinct message that starts with one of `prefixes` through once; others pass untouched.
    With to_log, that once goes to `log` (the log file) instead of through the library's logger."""

    def __init__(self, prefixes: tuple[str, ...], to_log: bool = False):
        super().__init__()
        self.prefixes, self.to_log = prefixes, to_log
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefixes):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        if self.to_log:
            log.info("%s: %s", record.name, message)
            return False
        return True


class WarningsToLog:
    """A `warnings.showwarning` that sends the first of each LOGGED_WARNINGS message to `log` (the log
    file), drops its repeats, and shows every other warning as before."""

    def __init__(self, show: Callable[..., None]):
        self.show = show
        self.logged: set[tuple[type[Warning], str]] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if any(issubclass(category, kind) and text.startswith(start) for kind, start in LOGGED_WARNINGS):
            if (category, text) not in self.logged:
                self.logged.add((category, text))
                log.info("%s (%s:%s): %s", category.__name__, filename, lineno, text)
            return
        self.show(message, category, filename, lineno, file, line)


def route_library_notices() -> None:
    """Show each known repetitive library warning once per process, and send the notices a user cannot
    act on to the log file (see the module docstring). Imports no library.

    Idempotent: a second call installs nothing more. Call it outside `warnings.catch_warnings()`
    blocks, which put the previous `warnings.showwarning` back when they end. A library logger named
    here need not exist yet: its filter waits on the logger object the library will get.
    """
    if not isinstance(warnings.showwarning, WarningsToLog):
        warnings.showwarning = WarningsToLog(warnings.showwarning)
    for table, to_log in ((ONCE_LOG_MESSAGES, False), (LOGGED_MESSAGES, True)):
        for name, prefixes in table.items():
            logger = logging.getLogger(name)
            if not any(isinstance(f, OncePerMessage) for f in logger.filters):
                logger.addFilter(OncePerMessage(prefixes, to_log=to_log))


def quiet_library_warnings() -> None:
    """What a stage run starts with: route_library_notices(), and no library progress bars where ours
    are off (progress_bars())."""
    route_library_notices()
    if not progress_bars():  # the libraries' own bars too (transformers' "Loading weights", datasets' maps)
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # its upload/download bars


def progress(iterable=None, **kwargs):
    """A tqdm bar over `iterable` (or updated by hand), drawn only where progress_bars() says: every bar of ours."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress_bars(), **kwargs)


def progress_bars() -> bool:
    """Whether to draw progress bars: on a terminal, not into a log (a worker's, CI's, a redirected run's),
    where every redraw is a line of noise. LMFORGE_NO_PROGRESS=1 turns them off, =0 on."""
    setting = os.environ.get("LMFORGE_NO_PROGRESS")
    if setting in ("0", "1"):
        return setting == "0"
    return sys.stderr is not None and sys.stderr.isatty()
