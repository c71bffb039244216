"""The command line's view of a run: one progress bar per stage on the terminal, every log line of the
run in a log file. A Dagster logger, so it sees what the assets log (`context.log`) and Dagster's own
events, in the same process; the UI and the daemon keep Dagster's default loggers."""

from __future__ import annotations

import logging
import re
import sys
import time

import dagster as dg

# What the assets log as they go; the bar reads these two forms.
PARTITIONS = re.compile(r"\((\d+)/(\d+) partitions\)\s*$")  # "... (3/72 partitions)"
STEPS = re.compile(r"^(\S+): step (\d+)/(\d+)")  # textual inversion: "<circle>: step 40/100, loss 0.12"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def partition_progress(done: int, total: int) -> str:
    """The suffix an asset's per-partition log line ends with, so the command line's bar advances."""
    return f"({done}/{total} partitions)"


class ProgressLines:
    """Per-partition progress lines for a run over many partitions: the first, the last, and at most one
    every `every` seconds in between. Each line is an event in Dagster's log; one per partition was a
    quarter of a large run's events."""

    def __init__(self, log, total: int, every: float = 5.0):
        self.log, self.total, self.every, self.last = log, total, every, None

    def __call__(self, done: int, message: str) -> None:
        now = time.monotonic()
        if done in (1, self.total) or self.last is None or now - self.last >= self.every:
            self.log.info(f"{message} {partition_progress(done, self.total)}")
            self.last = now


class _Bar(logging.Handler):
    """A tqdm bar for one run: partitions done, or textual-inversion steps over all its classes.

    Dagster may build a run's loggers more than once; every handler of a run shares its one bar."""

    _bars: dict = {}  # run id -> [bar, tokens seen]

    def __init__(self, run_id: str, label: str, partitions: int, stream):
        super().__init__(logging.DEBUG)  # Dagster logs the run's end at DEBUG
        from tqdm import tqdm

        self.run_id, self.partitions = run_id, partitions
        if run_id not in self._bars:
            self._bars[run_id] = [tqdm(
                total=partitions, desc=label, unit="partition", file=stream, leave=False, dynamic_ncols=True, disable=None,  # no bar when stderr is no terminal
                bar_format="  {desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} "
                           "[{elapsed}<{remaining}]{postfix}"), []]

    def emit(self, record: logging.LogRecord) -> None:
        if self.run_id not in self._bars:
            return
        bar, tokens = self._bars[self.run_id]
        meta = getattr(record, "dagster_meta", {}) or {}
        message = str(meta.get("orig_message") or record.getMessage())
        event = meta.get("dagster_event")
        if event is not None and event.event_type in (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE):
            bar.close()  # transient: the command prints the stage's line once it ends
            del self._bars[self.run_id]
        elif m := STEPS.match(message):
            token, step, steps = m.group(1), int(m.group(2)), int(m.group(3))
            if token not in tokens:
                tokens.append(token)
            bar.unit, bar.total = "step", max(1, self.partitions) * steps
            bar.n = (len(tokens) - 1) * steps + step
            bar.set_postfix_str(token, refresh=False)
            bar.refresh()
        elif m := PARTITIONS.search(message):
            bar.total, bar.n = int(m.group(2)), int(m.group(1))
            bar.refresh()


@dg.logger(
    {
        "file": dg.Field(str, description="Log file that gets every line of the run"),
        "label": dg.Field(str, default_value="", description="What the run does, beside its bar"),
        "partitions": dg.Field(int, default_value=1, description="Partitions the run materializes"),
        "bar": dg.Field(bool, default_value=True, description="Show a progress bar on stderr"),
    },
    description="di-assets command line: a progress bar on the terminal, every line in a log file",
)
def cli_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    from pathlib import Path

    cfg = init_context.logger_config
    logger = logging.Logger(f"di_assets.run.{init_context.run_id}", level=logging.DEBUG)
    Path(cfg["file"]).parent.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(cfg["file"], encoding="utf-8")
    file.setFormatter(logging.Formatter(LOG_FORMAT))
    file.setLevel(logging.DEBUG)
    logger.addHandler(file)
    if cfg["bar"]:
        logger.addHandler(_Bar(init_context.run_id, cfg["label"], cfg["partitions"], sys.stderr))
    return logger


def run_loggers(log_file, verbose: bool, label: str = "", partitions: int = 1, log_level: str = "INFO",
                bar: bool = True) -> dict:
    """Run config for the command line's runs: quiet (a bar; Dagster's lines in the log file) or verbose
    (Dagster's console lines as in `dagster dev`, and the log file)."""
    return {"loggers": {
        "console": {"config": {"log_level": log_level if verbose else "CRITICAL"}},
        "di_assets_cli": {"config": {"file": str(log_file), "label": label, "partitions": partitions,
                                     "bar": bar and not verbose}},
    }}


LOGGERS = {"console": dg.colored_console_logger, "di_assets_cli": cli_logger}
