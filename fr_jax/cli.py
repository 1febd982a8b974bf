"""What every fr_jax command shares: the one table of modes, and how a user's mistake is reported.

A mistake the user can fix (a bad config key, a missing file, a service that does not answer) is one line on
stderr that names the problem and the fix, and a non-zero exit status; the traceback is shown only under
`--debug`. A programming error still shows its traceback. Exit status: 0 done, 2 the user's mistake, 3 stopped on
a non-finite loss or gradient, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Mapping

from tqdm.contrib.logging import logging_redirect_tqdm

from fr_jax.config import ConfigError
from fr_jax.flow.mode import build_workflow_mode
from fr_jax.rl.modes import build_direct_mode
from fr_jax.rl.setup import ModeBuilder
from fr_jax.rollout import RolloutError
from fr_jax.sandbox.client import SandboxUnavailable
from fr_jax.trainer.step import NonFiniteError

DOCS = "README.md and docs/ in the fr_jax repository"

# grpo.mode -> how the mode is built from the grpo: section and the policy's tokenizer. The commands hand this table
# down to the GRPO round and the evaluation; nothing registers itself by being imported.
MODES: Mapping[str, ModeBuilder] = {"direct": build_direct_mode, "workflow": build_workflow_mode}


class CommandFailed(RuntimeError):
    """A step run as a child command failed; the message names it, its last line and its whole log."""


# errors that mean "the user's setup is wrong", each printed as one line (exit status 2)
USER_ERRORS: dict[type[BaseException], str] = {
    ConfigError: "config error",
    CommandFailed: "failed",
    SandboxUnavailable: "sandbox unavailable",
    RolloutError: "rollout server error",
    FileNotFoundError: "file not found",
}


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the command's docstring (what it does, where the docs are), with --debug."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"{doc.strip()}\n\nDocs: {DOCS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, and DEBUG logs")
    return p


def run(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`main(args)`, with the command's logging set up and errors reported as the module docstring says."""
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    logging.getLogger("fsspec.caching").setLevel(logging.WARNING)  # every block read of a gs:// checkpoint
    if not args.debug:  # one line per HTTP request (rollout, sandbox, worker) would bury the progress bars
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        with logging_redirect_tqdm():  # a log line goes above the progress bars, not into one
            return main(args)
    except tuple(USER_ERRORS) as err:
        if args.debug:
            traceback.print_exc()
        label = next(text for kind, text in USER_ERRORS.items() if isinstance(err, kind))
        print(f"{label}: {_one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        if args.debug:
            traceback.print_exc()
        print(f"training stopped: {_one_line(err)}", file=sys.stderr)
        return 3


def _one_line(err: BaseException) -> str:
    """The message on one line: its lines joined by "; " (after a heading that ends with ":", by a space)."""
    text = ""
    for line in (line.strip() for line in str(err).splitlines()):
        if line:
            text += ("" if not text else " " if text.endswith(":") else "; ") + line
    return text or type(err).__name__
