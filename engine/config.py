"""YAML configs whose keys are argument names: the file sets defaults, the command line wins.

Two keys of a config are not argument names:
- `include: PATH` (relative to the file's folder) reads another config first; the file's own keys win over
  it. The presets (configs/presets/) include the paper's recipe this way, e.g. `include: ../../cifar/cnn.yaml`.
- `distiller_overrides: {NAME: {key: value, ...}}` holds values that apply only when the run's distiller is
  NAME, for settings the paper tunes per method (OFA's --ofa-eps, its ImageNet lr). Precedence:
  command line > distiller_overrides of the chosen distiller > the file's keys > what it includes > defaults.
Both are resolved while parsing, so the saved args.yaml holds plain argument values only.
"""
import argparse
import os

import yaml

from kdcore.errors import UserError

INCLUDE, OVERRIDES = "include", "distiller_overrides"
NOT_SETTABLE = ("help", "config")  # argument names a config may not set


def _convert_one(action, value):
    if isinstance(value, str):
        return action.type(value)
    if action.type is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise ValueError(f"{value!r} is not an integer")
    if action.type in (int, float) and not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    if action.type in (int, float):
        return action.type(value)
    return action.type(str(value))  # a checking type (a paper stage): as the command line's text


def _convert(action, value):
    """Apply the argument's type to YAML scalars, as argparse does for strings on the command line.

    PyYAML reads `5e-4` (no dot) as a string, so a config's numbers are converted the same way the
    command line's are; a number where an integer is expected must be whole (8.5 is refused, 8.0 is 8).
    """
    if action.type is None or value is None:
        return value
    if isinstance(value, list):
        return [_convert_one(action, v) for v in value]
    return _convert_one(action, value)


def _read_mapping(path):
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path!r}; pass an existing YAML file to -c/--config "
                        f"(see configs/ for examples)")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config {path!r} is not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"config {path!r} must be a mapping of argument names to values")
    return cfg


def _arguments(parser, path, values, where, forbidden=NOT_SETTABLE):
    """`values` converted by their arguments' types; unknown names are an error naming them."""
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(k for k in values if k not in actions or k in forbidden)
    if unknown:
        raise UserError(f"config {path!r}: unknown key(s) {', '.join(unknown)}{where}; keys are argument names "
                        f"with underscores (e.g. batch_size for --batch-size): fix or remove them "
                        f"(`python train.py --help` lists every argument)")
    converted = {}
    for key, value in values.items():
        try:
            converted[key] = _convert(actions[key], value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            kind = getattr(actions[key].type, "__name__", "value")
            raise UserError(f"config {path!r}: {key}{where}: {value!r} is not a valid {kind} ({exc}); fix the "
                            f"value (the command line's --{key.replace('_', '-')} takes the same)") from None
    return converted


def _distiller_overrides(parser, path, table):
    """{distiller: {dest: value}} from a `distiller_overrides` mapping, checked like top-level keys."""
    choices = next(a.choices for a in parser._actions if a.dest == "distiller")
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise UserError(f"config {path!r}: {OVERRIDES} must map distiller names to mappings of argument names "
                        f"to values, e.g. {OVERRIDES}: {{ofa: {{ofa_eps: [1.5]}}}}")
    unknown = sorted(name for name in table if name not in choices)
    if unknown:
        raise UserError(f"config {path!r}: {OVERRIDES} names unknown distiller(s) {', '.join(unknown)}; "
                        f"choose from {', '.join(sorted(choices))}")
    checked = {}
    for name, values in table.items():
        where = f" in {OVERRIDES}.{name}"
        if "distiller" in values:
            where += " (an override cannot choose the distiller)"
        checked[name] = _arguments(parser, path, values, where, NOT_SETTABLE + ("distiller",))
    return checked


def load_config(parser, path, _including=()):
    """Read a YAML config (and what it includes): ({dest: value}, {distiller: {dest: value}})."""
    cfg = _read_mapping(path)
    include = cfg.pop(INCLUDE, None)
    overrides = _distiller_overrides(parser, path, cfg.pop(OVERRIDES, None) or {})
    values = _arguments(parser, path, cfg, "")
    if include is None:
        return values, overrides
    base_path = os.path.join(os.path.dirname(path), str(include))
    chain = _including + (os.path.realpath(path),)
    if os.path.realpath(base_path) in chain:
        raise UserError(f"config {path!r}: `{INCLUDE}: {include}` includes itself (through {' -> '.join(chain)})")
    base_values, base_overrides = load_config(parser, base_path, chain)
    merged = {name: {**base_overrides.get(name, {}), **overrides.get(name, {})}
              for name in {**base_overrides, **overrides}}
    return {**base_values, **values}, merged


def parse_args_with_config(parser, argv=None):
    """Parse `argv`; a `-c/--config FILE` among them sets the defaults first, then the overrides of the
    distiller the run uses (given on the command line or by the file)."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    known, _ = config_parser.parse_known_args(argv)
    if not known.config:
        return parser.parse_args(argv)
    values, overrides = load_config(parser, known.config)
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    chosen = overrides.get(getattr(args, "distiller", None))
    if not chosen:
        return args
    parser.set_defaults(**chosen)
    return parser.parse_args(argv)


def save_args_yaml(args, path):
    """Write the resolved arguments, loadable again with -c."""
    resolved = {k: v for k, v in vars(args).items() if k != "config"}
    with open(path, "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)


# What a resumed run may change; everything else comes from the run's checkpoint and must agree if given.
RESUME_MAY_CHANGE = ("epochs", "workers", "log_interval", "data_dir", "teacher_pretrained", "no_eval_teacher",
                     "validation_batch_size", "recovery_interval", "checkpoint_hist", "dist_timeout", "stop_signals")
_PER_LAUNCH = ("resume", "config", "local_rank", "no_resume_opt")


def explicit_arguments(parser, argv=None):
    """{dest: value} of what `argv` sets itself, on the command line or through its -c file; no defaults."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in defaults:
            action.default = argparse.SUPPRESS
        return vars(parse_args_with_config(parser, argv))
    finally:
        for action, default in defaults.items():
            action.default = default


def _agrees(name, value, recorded, recorded_given, defaults):
    """Whether a flag given again agrees with the run: with what the run was given (its default if it was not
    given), or with the value the run resolved. A checkpoint that records no given arguments (written before
    they were recorded) is compared with its resolved ones only."""
    if name in recorded and recorded[name] == value:
        return True
    return recorded_given is not None and recorded_given.get(name, defaults.get(name)) == value


def resumed_arguments(parser, argv, recorded, recorded_given=None):
    """The arguments of a resumed run: the run's own (`recorded` in its checkpoint, resolved), with the
    launch-specific ones and the few of RESUME_MAY_CHANGE taken from `argv`. Any other flag given again must agree
    with the run (`_agrees`), so the run's identical command line is accepted."""
    given = explicit_arguments(parser, argv)
    defaults = {action.dest: action.default for action in parser._actions if action.dest != "help"}
    conflicts = [name for name, value in given.items() if name not in RESUME_MAY_CHANGE + _PER_LAUNCH
                 and (name in recorded or recorded_given is not None)
                 and not _agrees(name, value, recorded, recorded_given, defaults)]
    if conflicts:
        def was(name):
            if recorded_given is not None:
                return repr(recorded_given.get(name, defaults.get(name)))
            return repr(recorded.get(name))
        flags = ", ".join(f"--{name.replace('_', '-')} {given[name]!r} (the run has {was(name)})"
                          for name in conflicts)
        may_change = ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_MAY_CHANGE)
        raise UserError(f"--resume continues a run with its own arguments (its args.yaml), but {flags}; drop those "
                        f"flags, or start a new run from its weights with --initial-checkpoint. On resume only "
                        f"{may_change} may change")
    merged = {**defaults, **recorded}  # flags added since the checkpoint was written take their defaults
    merged.update({name: value for name, value in given.items() if name in RESUME_MAY_CHANGE})
    merged.update({name: given.get(name, defaults[name]) for name in _PER_LAUNCH})  # this launch's, not the run's
    return argparse.Namespace(**merged)
