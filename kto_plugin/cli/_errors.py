"""What the command line does with a mistake: one line on stderr (what, where, the fix) and a non-zero exit.

* `run` turns every error a command raises into that line (exit 1; 2 for a usage error, as argparse), with
  `KTOConfig.beta` written as the flag ``--beta`` and a data error's fix phrased for the data file
  (`kto_plugin.DataError.file_fix`); ``KTO_PLUGIN_TRACEBACK=1`` shows the traceback instead.
* `check_flags` refuses an unknown flag with the closest known one (``--betta``: did you mean ``--beta``?).
* `check_local_path` says "no such file" for a path that cannot be a Hub id; `named_source` explains a name
  that is neither a local path nor loadable from the Hub, with the closest file or folder here.
* `check_tokenizer` asks for ``--tokenizer_name_or_path`` when a model folder holds no tokenizer.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from ..errors import DataError

TRACEBACK_ENV = "KTO_PLUGIN_TRACEBACK"
# errors kto_plugin raises on purpose, with a message written for users
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError, ArithmeticError)
# files a tokenizer is saved as (fast, slow, sentencepiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
# extensions of files a user names; a Hub id has none of them
_FILE_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".gz", ".yaml", ".yml",
                    ".safetensors", ".bin", ".pt")


class UsageError(Exception):
    """A command line that does not parse (unknown flag, bad value): exit status 2, as argparse."""


class CLIError(Exception):
    """A mistake on the command line found by the command (a missing file, a folder without tokenizer)."""


def usage_error(message: str) -> NoReturn:
    """`ArgumentParser.error` for our parsers: one line instead of the usage of every flag."""
    raise UsageError(message)


def run(command: Callable[[list[str]], int], argv: list[str], prog: str) -> int:
    """`command(argv)`; an error becomes one line on stderr and exit status 1 (2 for a usage error)."""
    try:
        return command(argv)
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


def one_line(err: BaseException) -> str:
    """`err` as one line for someone at the command line."""
    if isinstance(err, DataError):
        text = err.for_file()
    elif isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])  # not KeyError's repr with quotes
    else:
        text = str(err)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\bKTOConfig\.(\w+)", r"--\1", text)  # every KTOConfig field is a flag of the same name
    origin = _raised_in(err)
    if isinstance(err, (UsageError, CLIError, DataError)) or (origin == "kto_plugin"
                                                              and isinstance(err, _USER_ERRORS)):
        return text
    where = f" (from {origin})" if origin and origin != "kto_plugin" else ""
    return f"{type(err).__name__}{where}: {text} ({TRACEBACK_ENV}=1 shows the traceback)"


def _raised_in(err: BaseException) -> str:
    """The top-level package whose code raised `err`."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    path = frames[-1].filename.replace(os.sep, "/")
    if "/kto_plugin/" in path:
        return "kto_plugin"
    match = re.search(r"/site-packages/([A-Za-z_][\w]*)", path)
    return match.group(1) if match else ""


def check_flags(parser: Any, argv: Sequence[str]) -> None:
    """Refuse what the parser does not know, naming the closest flag."""
    _, remaining = parser.parse_known_args(args=list(argv))
    known = sorted(s for s in parser._option_string_actions if s.startswith("--"))
    for arg in remaining:
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            raise UsageError(f"unknown flag {flag}.{did_you_mean(flag, known)} 'kto-plugin train --help' lists "
                             "every flag.")
    if remaining:
        raise UsageError(f"unexpected argument {remaining[0]!r} (a value with no flag before it, or a flag that takes "
                         "one value given several).")


def did_you_mean(name: str, options: Sequence[str], quote: Callable[[str], str] = str) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean {quote(match[0])}?" if match else ""


def looks_local(name: str) -> bool:
    """A name that cannot be a Hub id: a path from here, home or root, or a file name with an extension."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or os.path.splitext(name)[1].lower() in _FILE_EXTENSIONS)


def _nearby(name: str) -> str:
    """The closest file or folder beside where `name` points."""
    path = os.path.expanduser(name)
    parent = os.path.dirname(path) or "."
    try:
        entries = os.listdir(parent)
    except OSError:
        return ""
    match = difflib.get_close_matches(os.path.basename(path.rstrip("/")), entries, n=1, cutoff=0.6)
    return f" Did you mean {os.path.join(os.path.dirname(name), match[0])!r}?" if match else ""


def check_local_path(flag: str, name: str | None) -> None:
    """"No such file" for a path that is missing (a Hub id is left for loading to find)."""
    if name and looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise CLIError(f"{flag} {name!r}: no such file or directory ({os.path.abspath(os.path.expanduser(name))})."
                       f"{_nearby(name)}")


@contextlib.contextmanager
def named_source(flag: str, name: str | None) -> Iterator[None]:
    """Loading `name`: a failure for a name that is not a local path says so, with the closest one here."""
    try:
        yield
    except (OSError, ValueError) as err:
        if not name or os.path.exists(os.path.expanduser(name)) or isinstance(err, DataError):
            raise
        reason = re.sub(r"\s+", " ", str(err)).strip()
        raise CLIError(f"{flag} {name!r} is neither a file or folder here ({os.path.abspath(name)}) nor loadable "
                       f"from the Hub ({reason[:300]}).{_nearby(name)}") from err


def check_tokenizer(model_name: str | None, tokenizer_name: str | None) -> None:
    """A local model folder without tokenizer files needs ``--tokenizer_name_or_path`` (an adapter folder saved
    without one takes its base model's)."""
    from ..trainer._models import is_adapter_folder

    if tokenizer_name is not None or model_name is None or not os.path.isdir(model_name):
        return
    if is_adapter_folder(model_name):
        return
    if not any(os.path.isfile(os.path.join(model_name, f)) for f in TOKENIZER_FILES):
        raise CLIError(
            f"the model folder {model_name!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}, ...). "
            "Pass --tokenizer_name_or_path with the folder or Hub id of its tokenizer (e.g. the model it was "
            "trained from), or save the tokenizer into the folder: tokenizer.save_pretrained(folder)."
        )


@contextlib.contextmanager
def data_source(source: str) -> Iterator[None]:
    """A data error while preparing `source` names it (the file the user edits)."""
    try:
        yield
    except DataError as err:
        file_fix = err.file_fix.replace("the data file", source) if err.file_fix else None
        raise DataError(f"{source} (rows count from 0): {err.problem}", err.fix, file_fix) from err
