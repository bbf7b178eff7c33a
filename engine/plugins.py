"""`--import MODULE`: user modules imported before the arguments are parsed, so that what they register (a dataset
with `engine.datasets.register_dataset`, a distiller with `distillers.register_distiller`, a timm model with
`timm.models.register_model`) is a valid choice of the command line, without editing the repo.

MODULE is a dotted module name importable from the Python path (e.g. `PYTHONPATH=. python train.py --import
my_datasets ...`) or the path of a .py file (`--import ./my_datasets.py`).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import Iterable, Optional, Sequence

from kdcore.errors import UserError

IMPORT_FLAG = "--import"


def add_import_argument(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable `--import MODULE` flag (stored as `args.import_modules`)."""
    parser.add_argument(IMPORT_FLAG, dest="import_modules", action="append", default=[], metavar="MODULE",
                        help="import MODULE (a dotted name on the Python path, or a .py file) before parsing, e.g. "
                             "one that registers a dataset, distiller or timm model; repeatable")


def import_modules(names: Iterable[str]) -> None:
    """Import each module of `names` (dotted names or .py paths); importing one twice is harmless."""
    for name in names:
        if name.endswith(".py"):
            _import_file(name)
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name and not name.startswith(f"{exc.name}."):
                raise  # the module exists but imports something missing: its own traceback tells more
            raise UserError(f"{IMPORT_FLAG} {name}: no module named {name!r} on the Python path; add its folder to "
                            f"PYTHONPATH (e.g. PYTHONPATH=. python ...) or pass the .py file's path") from None


def _import_file(path: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{IMPORT_FLAG} {path}: no such file; pass an existing .py file or a dotted module name")
    name = os.path.splitext(os.path.basename(path))[0]
    if getattr(sys.modules.get(name), "__file__", None) == os.path.abspath(path):
        return
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # by name, so that pickled objects of the module (DataLoader workers) resolve
    spec.loader.exec_module(module)


def import_modules_of_command_line(argv: Optional[Sequence[str]]) -> None:
    """Import the `--import` modules of `argv` (None: sys.argv[1:]) ahead of building the real parser."""
    parser = argparse.ArgumentParser(add_help=False)
    add_import_argument(parser)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    import_modules(known.import_modules)
