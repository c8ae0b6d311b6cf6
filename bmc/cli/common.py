"""What every group of the ``bmc`` command line shares: the one-line error, the front door that
catches the domain errors once, the check for the training packages, and the options that recur."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import click

from bmc.edge_app.classifier import DEFAULT_ORIENTATIONS
from bmc.errors import BmcError

# the label sources of train/data.py (folder, file-name prefix, PBC maturation stage); written here
# too so that the device's CLI does not import the training package to build its options
LABEL_SOURCES = ("folder", "prefix", "stage")

_P = ParamSpec("_P")
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


class CliFail(click.ClickException):
    """An expected error: one line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def one_line_errors(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``fn(*args, **kwargs)``, an expected error (:class:`bmc.errors.BmcError`, a missing file)
    turned into one line and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except (BmcError, FileNotFoundError) as e:
        raise CliFail(str(e)) from e


class MainGroup(click.Group):
    """The front door: a domain error raised anywhere below a verb is caught here, once."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BmcError as e:
            raise CliFail(str(e)) from e
        except OSError as e:  # a file named on the command line that cannot be read or written
            if e.filename is None:
                raise
            raise CliFail(f"{e.filename}: {e.strerror or e}") from e
        except sqlite3.DatabaseError as e:  # damage found deep in a query, past the checks that name the file
            raise CliFail(f"a session database is damaged ({e}): nothing more was read or written") from e


def need_training(verb: str, module: str, *also: str) -> None:
    """One clear line, not a traceback, when a verb that trains or converts runs on a device
    install (the edge extra has no Keras, TensorFlow or scikit-learn)."""
    import importlib
    import importlib.util

    missing = [m for m in also if importlib.util.find_spec(m) is None]
    if not missing:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing = [e.name or str(e)]
    if missing:
        raise CliFail(
            f"{verb} needs the training packages, not installed here (missing: {', '.join(missing)}): "
            "pip install '.[train]' from the bmc checkout on a workstation or server; a device needs only [edge]"
        )


def write_json(path: str | Path, obj: object) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)


#: ``--json FILE``: the verbs that report write their figures there too
json_option = click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the results as JSON")


def orientations_option(
    default: str = str(DEFAULT_ORIENTATIONS), help: str = "orientations each cell is classified in, averaged"
) -> Callable[[_F], _F]:
    """``--orientations``: the rotations / mirror images each cell is classified in, averaged."""
    return click.option(
        "--orientations", type=click.Choice(["1", "2", "4", "8"]), default=default, show_default=True, help=help
    )


def truth_options(fn: _F) -> _F:
    """``--source`` and ``--truth``: the fields (or cell images) of a bench and their ``file,label``
    truth, as ``bmc bench truth`` writes it (``bench adapt``, ``autonomy``, ``differential``)."""
    fn = click.option(
        "--truth",
        "truth_file",
        required=True,
        type=click.Path(dir_okay=False),
        help="CSV file,label (bmc bench truth writes BCCD's and Munich's)",
    )(fn)
    return click.option(
        "--source", required=True, type=click.Path(file_okay=False), help="folder the --truth files are under"
    )(fn)


def _seeds(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated integers") from None


#: ``--seeds``: which fields a bench's simulated laboratory reviews, one run per seed
seeds_option = click.option(
    "--seeds", default="1,2,3", show_default=True, callback=_seeds, help="comma-separated: one run per seed"
)

#: ``--threads``: the interpreter's threads
threads_option = click.option("--threads", type=click.IntRange(1, 256), help="inference threads (default: all cores)")
