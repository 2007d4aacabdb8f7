"""Telling the project's own errors about a setting or a file from a bug's, so that the command prints them plainly."""

from __future__ import annotations

import dis

# The types the project raises about settings and files (`raise ValueError(f"Expected `x` ...")`).
PROJECT_ERRORS = (ValueError, OSError, TypeError, RuntimeError, FloatingPointError)
PROJECT_PACKAGE = "plugguide."


def raised_by_statement(error: BaseException) -> bool:
    """Whether `error` left its innermost frame through a `raise` statement (a `RAISE_VARARGS` instruction).

    A deliberate `raise ValueError(...)` does; a bug's error (`int("x")`, a wrong call) stops at the instruction
    that failed instead. Read from the frame's bytecode, so it needs no source file.
    """
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    instruction = next((i for i in dis.get_instructions(frame.tb_frame.f_code) if i.offset == frame.tb_lasti), None)
    return instruction is not None and instruction.opname == "RAISE_VARARGS"


def raised_by_project(error: BaseException) -> bool:
    """Whether a `raise` statement in a module of the project threw `error`, of a type it raises about settings."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    module = frame.tb_frame.f_globals.get("__name__", "") if frame is not None else ""
    return isinstance(error, PROJECT_ERRORS) and module.startswith(PROJECT_PACKAGE) and raised_by_statement(error)


def project_error(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain that the project raised about a setting or a file, if any.

    jsonargparse wraps a constructor's error in its own (a Union of subclasses, with a Namespace dump); the
    project's message is the cause inside it.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if raised_by_project(error):
            return error
        error = error.__cause__ or error.__context__
    return None
