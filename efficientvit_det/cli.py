"""How the command-line tools end: one line for a user's mistake, exit codes scripts rely on.

Every tool's ``__main__`` is ``sys.exit(run_tool(main))``. A mistake in what the user gave (a
missing or broken file, a checkpoint that does not fit the config, an unsafe pickle, a bad
option value) is raised as :class:`UserInputError` (or one of the types :func:`_user_errors` lists) with a
message that says what to change; it is printed as one line, ``error: <message>``, without a
traceback. Anything else is a bug or a failure of the machine and keeps its traceback.

Exit codes: 0 success; 1 the run failed (an unexpected exception); 2 bad input (this module,
and argparse's usage errors); 130 interrupted. The traceback of a user error is not lost: it
goes to the log file of the run when one is open (``work_dir/<timestamp>/<timestamp>.log``).

How tools talk (the rest of this module): quiet by default. :func:`quiet_console` keeps
mmengine's console at warnings (the environment and config dumps stay in the log file) and
drops the known third-party warnings listed in :data:`KNOWN_NOISE` (``--verbose`` shows all);
:class:`Progress` prints count, rate and ETA lines for anything that takes more than a few
seconds; :func:`wrote` ends a tool with where its files are.
"""
from __future__ import annotations

import logging
import re
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO, Tuple, Type

__all__ = ['UserInputError', 'EXIT_OK', 'EXIT_FAILED', 'EXIT_BAD_INPUT', 'EXIT_INTERRUPTED',
           'run_tool', 'fail', 'KNOWN_NOISE', 'quiet_console', 'known_warnings_silenced',
           'Progress', 'format_duration', 'is_main_process', 'wrote']

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserInputError(Exception):
    """Something the user gave cannot be used; the message says what and what to change."""


def _user_errors() -> Tuple[Type[BaseException], ...]:
    """The exception types that mean "bad input" (imported lazily: a tool's --help stays fast)."""
    errors = [UserInputError, FileNotFoundError, IsADirectoryError, NotADirectoryError]
    try:
        from efficientvit_det.checkpoint import UnsafeCheckpointError
        from efficientvit_det.checkpoint.backbone import CheckpointLayoutError
        from efficientvit_det.checkpoint.detector import CheckpointMismatchError
        from efficientvit_det.datasets.coco_checks import CocoAnnotationError
        from efficientvit_det.datasets.robust_loading import ImageLoadError
        errors += [UnsafeCheckpointError, CheckpointLayoutError, CheckpointMismatchError,
                   CocoAnnotationError, ImageLoadError]
    except ImportError:  # torch-only environment: the checkpoint room needs mmengine
        pass
    return tuple(errors)


def fail(message: str) -> None:
    """Raise :class:`UserInputError` (for checks written as one line)."""
    raise UserInputError(message)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f'{text}: {exc.filename}'
    if 'Original Traceback' in text:  # re-raised from a DataLoader worker: its last line
        last = text.strip().splitlines()[-1]
        text = re.sub(r'^[\w.]+(Error|Exception): ', '', last)
    return ' '.join(text.split())


def _log_to_files(exc: BaseException) -> None:
    """The full traceback of ``exc`` into the log files of the current mmengine logger (the
    console shows one line)."""
    try:
        from mmengine.logging import MMLogger
    except ImportError:
        return
    if not MMLogger._instance_dict:
        return
    logger = MMLogger.get_current_instance()
    text = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0,
                               f'stopped: {_one_line(exc)}\n{text}', None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_tool(main: Callable[[Optional[Sequence[str]]], Any],
             argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's ``main(argv)`` and turn its outcome into an exit code.

    A user error prints ``error: <message>`` on stderr and returns 2; ``main`` returning an
    int returns it; anything else returns 0.
    """
    try:
        result = main(argv)
    except _user_errors() as exc:
        _log_to_files(exc)
        print(f'error: {_one_line(exc)}', file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK


# ---------------------------------------------------------------------------------------------
# quiet by default
# ---------------------------------------------------------------------------------------------
#: Messages of third-party code a user can do nothing about, seen on every good run of the
#: tools (mmengine 0.10.7 / mmdet 3.3 / torch 2.14): (kind, message regex); ``log``: mmengine's
#: logger, ``warning``: Python's warnings. A good ``tools/infer.py`` run printed the registry,
#: vis-backend, bbox and polygon ones; training the FileClient ones. They are silenced one by
#: one, never with a global ignore; ``--verbose`` shows them.
KNOWN_NOISE: Tuple[Tuple[str, str], ...] = (
    # mmengine's CheckpointHook / DetInferencer use mmengine's own deprecated FileClient
    ('log', r'"FileClient" will be deprecated'),
    ('log', r'"HardDiskBackend" is the alias of "LocalBackend"'),
    # DetInferencer looks its transforms up in the 'mmdet' scope after the config's
    ('log', r'Failed to search registry with scope "mmdet" in the "function" registry'),
    # mmdet's visualiser: DetInferencer has no vis backend to add images to
    ('warning', r'Failed to add <class .mmengine\.visualization\.vis_backend\.LocalVisBackend'),
    # mmdet's visualiser drawing a box or label that touches the border of a small image
    ('warning', r'Warning: The polygon is out of bounds'),
    ('warning', r'Warning: The bbox is out of bounds'),
    ('warning', r'Warning: The text is out of bounds'),
    # mmengine's list of every tensor that did not fit, after --no-strict: the tools have
    # printed the one-line summary (efficientvit_det.checkpoint.detector.checkpoint_mismatch)
    ('log', r'The model and loaded state dict do not match exactly'),
)


#: Info messages a quiet console still shows: what the tool decided about the user's files
#: (the inference precision and why; the original's checkpoint keys converted on load).
KEEP_INFO: Tuple[str, ...] = (r'^precision: ', r'^(backbone|neck|model): converted ')


class _QuietConsole(logging.Filter):
    """A console handler's filter: warnings and errors without the ``KNOWN_NOISE``, plus the
    ``KEEP_INFO`` messages."""

    NOISE = tuple(re.compile(p) for kind, p in KNOWN_NOISE if kind == 'log')
    KEEP = tuple(re.compile(p) for p in KEEP_INFO)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.levelno < logging.WARNING:
            return any(p.search(msg) for p in self.KEEP)
        return not any(p.search(msg) for p in self.NOISE)


def quiet_console(logger: Optional[logging.Logger] = None) -> None:
    """Show only warnings and errors of ``logger`` (default: mmengine's current logger) on the
    console, without the known noise, and the few ``KEEP_INFO`` lines; its log file keeps
    everything."""
    if logger is None:
        from mmengine.logging import MMLogger
        logger = MMLogger.get_current_instance()
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and \
                not isinstance(handler, logging.FileHandler) and \
                not any(isinstance(f, _QuietConsole) for f in handler.filters):
            handler.addFilter(_QuietConsole())


@contextmanager
def known_warnings_silenced(enabled: bool = True) -> Iterator[None]:
    """Python warnings of :data:`KNOWN_NOISE` are not shown while this is active."""
    with warnings.catch_warnings():
        if enabled:
            for kind, pattern in KNOWN_NOISE:
                if kind == 'warning':
                    warnings.filterwarnings('ignore', message=pattern)
        yield


# ---------------------------------------------------------------------------------------------
# progress and where things were written
# ---------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """``0:07``, ``12:30``, ``1:02:03``."""
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
    """Progress lines of work with a known count: ``  test 40/200 images (20%)  5.1 images/s
    elapsed 0:08  eta 0:31``, at most one every ``interval`` seconds, and a last line when
    done. ``interval`` also delays the first line: work that ends sooner prints only that."""

    def __init__(self, total: int, what: str = 'images', label: str = '',
                 interval: float = 5.0, stream: Optional[TextIO] = None) -> None:
        self.total, self.what, self.label = int(total), what, label
        self.interval = interval
        self.stream = stream
        self.count = 0
        self.t0 = self._last = time.monotonic()

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = self.count / elapsed if elapsed > 0 else 0.0
        pct = f' ({100 * self.count // self.total}%)' if self.total else ''
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        label = f'{self.label} ' if self.label else ''
        return (f'  {label}{self.count}/{self.total} {self.what}{pct}  {rate:.1f} {self.what}/s'
                f'  elapsed {format_duration(elapsed)}  eta {format_duration(eta)}')

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= self.interval and self.count < self.total:
            self._last = now
            self._print(self.line())

    def done(self) -> None:
        elapsed = time.monotonic() - self.t0
        label = f'{self.label}: ' if self.label else ''
        rate = f', {self.count / elapsed:.1f} {self.what}/s' if elapsed > 0 else ''
        self._print(f'  {label}{self.count} {self.what} in {format_duration(elapsed)}{rate}')


def is_main_process() -> bool:
    """Rank 0 of a distributed run (``RANK`` as torchrun / mmengine set it), or no such run:
    only this process prints progress and where files went."""
    import os
    return os.environ.get('RANK', '0') == '0'


def wrote(what: str, path: str) -> None:
    """The last lines of a tool: ``what: path`` (absolute path), one per output."""
    import os.path as osp
    if is_main_process():
        print(f'{what + ":":<16} {osp.abspath(path)}', flush=True)
