"""The column options `edgepeft train` and `edgepeft eval` share: which columns of the data hold the prompt,
the answer, the text and the label, one per option or as one ``--columns`` mapping."""

from __future__ import annotations

import click

from ..errors import UsageError

_ROLES = {"prompt_column": "prompt", "completion_column": "completion", "text_column": "text",
          "label_column": "label"}


def column_options(fn):
    """Add --prompt-column, --completion-column, --text-column, --label-column and --columns to a command."""
    fn = click.option("--columns", "columns", default=None, metavar="ROLE=COL,...",
                      help="Map the data's columns at once, e.g. prompt=question,completion=answer or "
                           "text=body,label=category (roles: prompt, completion, text, label, messages, "
                           "system).")(fn)
    for opt, role in reversed(list(_ROLES.items())):
        fn = click.option(f"--{opt.replace('_', '-')}", opt, default=None, metavar="COL",
                          help=f"The column that holds the {role} [default: '{role}', or a usual name for it "
                               "when --task is given].")(fn)
    return fn


def pop_columns(kwargs: dict) -> dict | None:
    """Take the column options out of a command's ``kwargs``: the mapping ``{role: column}``, or None.
    Raises :class:`UsageError` when --columns and a single option disagree about one role."""
    from ..contracts.records import parse_columns

    mapping = parse_columns(kwargs.pop("columns", None))
    for opt, role in _ROLES.items():
        col = kwargs.pop(opt, None)
        if col is None:
            continue
        if mapping.get(role, col) != col:
            raise UsageError(f"--{opt.replace('_', '-')} {col} and --columns {role}={mapping[role]} disagree",
                             hint="name each column once")
        mapping[role] = col
    return mapping or None
